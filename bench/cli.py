"""The ``bench`` command: info, run, generate, runs, export, report, compare, train, quality, serve, load, dashboard.

Bad input (a ``UsageError`` here, an ``InputError`` from below) is one line on stderr and
exit code 2, never a traceback. A backend that cannot do what was asked is one line and
exit code 1. Anything else is a bug: its traceback and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from model.errors import InputError

EXIT_USAGE = 2
EXIT_FAILURE = 1

err = Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Console:
    """Standard output; wide enough when piped that tables are not cut."""
    return Console() if sys.stdout.isatty() else Console(width=200)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _threads(text) -> list:
    """Thread counts: '1,2', '1-4', 'default' (the libraries' own choice) or 'all' (one per
    physical core this process may use, ``bench.machine.all_threads``), also inside a list ('1,all')."""
    from bench.machine import all_threads
    from bench.sweep import parse_list

    if text in ("default", "auto"):
        return [None]
    cores = str(all_threads())
    items = text if isinstance(text, list) else str(text).split(",")
    items = [cores if str(i).strip() == "all" else i for i in items]
    return parse_list(items if isinstance(text, list) else ",".join(map(str, items)), "threads", integer=True)


# -- bench info ------------------------------------------------------------------------------


def cmd_info(args) -> int:
    from backends import registry
    from bench.machine import fingerprint

    fp = fingerprint()
    probes = registry.probe_all()
    torch_build = _torch_build()
    roofline = None if args.no_roofline else _roofline(args.threads, refresh=args.remeasure)
    if args.json:
        print(json.dumps(dict(fingerprint=fp, torch_build=torch_build, roofline=roofline,
                              backends={n: p.to_dict() for n, p in probes.items()}), indent=2))
        return 0
    out = out_console()
    cpu = fp["cpu"]
    machine = Table(title="Machine", show_header=False, title_justify="left")
    machine.add_row("CPU", f"{cpu['brand']} ({cpu['arch']})")
    machine.add_row("Cores", f"{cpu['cores_physical']} physical, {cpu['cores_logical']} logical")
    machine.add_row("ISA", "  ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["isa"].items()))
    machine.add_row("Memory", f"{fp['memory_gb']:.1f} GB")
    machine.add_row("OS", f"{fp['os']}, Python {fp['python']}")
    gpus = fp.get("gpus") or []
    machine.add_row("GPUs", ", ".join(g["name"] for g in gpus) if gpus else "none found")
    if roofline:
        peaks = ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in roofline["peak_gflops"].items())
        machine.add_row("Measured", f"memory bandwidth {roofline['bandwidth_gb_s']:.1f} GB/s; matmul {peaks} "
                                    f"({roofline['threads']} threads)")
    machine.add_row("torch build", ", ".join(f"{k} {v}" for k, v in torch_build.items()))
    out.print(machine)
    versions = Table(title="Libraries", title_justify="left")
    versions.add_column("library")
    versions.add_column("version")
    for name, version in fp["versions"].items():
        versions.add_row(name, version or "not installed")
    out.print(versions)
    table = Table(title="Backends", title_justify="left")
    for col in ("backend", "status", "devices", "reason / fix"):
        table.add_column(col)
    for name, p in probes.items():
        status = "[green]available[/]" if p.available else "[red]unavailable[/]"
        why = p.reason + (f" — fix: {p.fix}" if p.fix else "")
        table.add_row(name, status, ", ".join(p.devices), why)
    out.print(table)
    return 0


def _torch_build() -> dict:
    try:
        from backends.mkl import torch_build_info
    except ImportError:
        return {}
    return torch_build_info()


def _roofline(threads: int | None, store: str | None = None, refresh: bool = False) -> dict | None:
    """The machine's bandwidth and matmul peaks, measured once and cached beside the store."""
    from bench.roofline import measure_roofline

    cache = Path(store).parent / "roofline.json" if store else None
    err.print("[dim]memory bandwidth and matmul peak: measured once per machine and thread count, then cached "
              "(bench info --remeasure measures again)[/]")
    return measure_roofline(threads=threads, cache=cache, refresh=refresh)


# -- bench run -------------------------------------------------------------------------------


def build_sweep(args):
    from bench.sweep import Sweep, SweepError, load_toml, parse_list

    values = load_toml(args.config) if args.config else {}
    if args.config:
        from model.storage import localize
        values.update({k: localize(values[k]) for k in ("model", "checkpoint") if k in values})
    cli = dict(model=args.model, checkpoint=args.checkpoint, backend=args.backend, precision=args.precision,
               batch=args.batch, threads=args.threads, prompt_len=args.prompt_len, gen_len=args.gen_len,
               timeout=args.timeout, budget=args.budget, target_ci=args.target_ci, launches=args.launches,
               planted_delay=args.plant_slowdown, scenario=args.scenario, seq_len=args.seq_len,
               grad_checkpointing=args.grad_checkpointing, train_steps=args.train_steps,
               warmup_steps=args.warmup_steps)
    values.update({k: v for k, v in cli.items() if v is not None})
    if args.no_parity:
        values["parity"] = False
    if getattr(args, "option", None):
        values["options"] = dict(values.get("options") or {}, **_sweep_options(args.option))

    sweep = Sweep()
    if values.get("checkpoint"):
        if values.get("model") and args.model is not None:
            raise SweepError("give --model or --checkpoint, not both")
        dirs = parse_list(values["checkpoint"], "checkpoint") if not isinstance(values["checkpoint"], bool) \
            else parse_list(values["model"], "model")
        for d in dirs:
            if not Path(d).is_dir():
                raise SweepError(f"checkpoint directory {d!r} does not exist")
        sweep.models, sweep.checkpoint = [str(Path(d).resolve()) for d in dirs], True
    elif "model" in values:
        from model.gpt import get_config

        from bench.sweep import is_checkpoint_dir

        sweep.models = parse_list(values["model"], "model")
        for i, m in enumerate(sweep.models):
            if is_checkpoint_dir(m):  # a trained checkpoint beside the presets
                sweep.models[i] = str(Path(m).resolve())
            elif "/" in m:
                raise SweepError(f"checkpoint directory {m!r} does not exist (make bench trains it: "
                                 f"bench train --config sweeps/train-small.toml --out {m})")
            else:
                get_config(m)  # unknown presets fail here, with the valid names
    if "backend" in values:
        sweep.backends = parse_list(values["backend"], "backend")
    if "precision" in values:
        from backends.base import PRECISIONS

        sweep.precisions = parse_list(values["precision"], "precision")
        for p in sweep.precisions:
            if p not in PRECISIONS:
                raise SweepError(f"--precision: unknown precision {p!r}; valid: {', '.join(PRECISIONS)}")
    if sweep.checkpoint or "model" in values:
        _check_quantized_targets(sweep)
    if "batch" in values:
        sweep.batches = parse_list(values["batch"], "batch", integer=True)
    if "threads" in values:
        sweep.threads = _threads(values["threads"])
    for key, attr in (("prompt_len", "prompt_len"), ("gen_len", "gen_len")):
        if key in values:
            v = values[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SweepError(f"--{key.replace('_', '-')}: {v!r} must be a positive integer")
            setattr(sweep, attr, v)
    for key, attr in (("timeout", "timeout_s"), ("budget", "budget_s"), ("target_ci", "target_ci")):
        if key in values:
            v = values[key]
            if not isinstance(v, (int, float)) or v <= 0:
                raise SweepError(f"--{key.replace('_', '-')}: {v!r} must be a positive number")
            setattr(sweep, attr, float(v))
    if "launches" in values:
        v = values["launches"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SweepError(f"--launches: {v!r} must be a positive integer")
        sweep.launches = v
    if "planted_delay" in values:
        v = values["planted_delay"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 10:
            raise SweepError(f"--plant-slowdown: {v!r} must be a fraction between 0 and 10")
        sweep.planted_delay = float(v)
    if "parity" in values:
        sweep.parity = bool(values["parity"])
    if "seed" in values:
        sweep.seed = int(values["seed"])
    _train_axes(sweep, values)
    if "options" in values:
        sweep.options = _option_axis(values["options"])
    return sweep


def _sweep_options(items: list[str]) -> dict[str, str]:
    """``--option KEY=V1,V2`` (repeatable) -> {key: "V1,V2"}."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE[,VALUE...], e.g. int8_scheme=per_tensor,per_channel")
        out[key.strip()] = value
    return out


def _option_axis(table) -> dict[str, list]:
    """The swept options from --option or a TOML [options] table: each a list of values, a value that
    reads as JSON (32, true) taken as that; "a,b" and ["a", "b"] alike."""
    from bench.sweep import SweepError, parse_list

    if not isinstance(table, dict):
        raise SweepError(f"options must be a table of option = values, not {table!r}")
    out = {}
    for key, value in table.items():
        items = value if isinstance(value, list) else parse_list(value, f"option {key}") if isinstance(value, str) \
            else [value]
        values = [_option_value(v) if isinstance(v, str) else v for v in items]
        if not values:
            raise SweepError(f"--option {key}: no values")
        out[key] = list(dict.fromkeys(values))
    return out


def _check_quantized_targets(sweep) -> None:
    """A quantised checkpoint named with backends (not 'all') none of which reads it is bad input."""
    from backends import registry
    from bench.sweep import SweepError, is_checkpoint_dir, quantized_target

    if sweep.backends == ["all"]:
        return
    for model in sweep.models:
        target = quantized_target(model) if (sweep.checkpoint or is_checkpoint_dir(model)) else None
        if target is None:
            continue
        runs = [(b, p) for b in sweep.backends
                for p in (sweep.precisions or [registry.get_backend_class(b).default_precision])]
        if target[:2] not in runs:
            raise SweepError(f"{model}: a quantised checkpoint for --backend {target[0]} --precision {target[1]} "
                             f"({target[2]}); it is never dequantised to run elsewhere")


def _train_axes(sweep, values: dict) -> None:
    """--scenario and the training axes (--seq-len, --grad-checkpointing, --train-steps, --warmup-steps)."""
    from bench.spec import SCENARIOS
    from bench.sweep import SweepError, parse_list

    scenario = values.get("scenario", "inference")
    if scenario not in SCENARIOS:
        raise SweepError(f"--scenario: {scenario!r} is not one of {', '.join(SCENARIOS)}")
    if scenario == "serve":
        raise SweepError("scenario serve runs from the command line (bench run --scenario serve), not from --config")
    sweep.scenario = scenario
    given = [k for k in ("seq_len", "grad_checkpointing", "train_steps", "warmup_steps") if k in values]
    if given and scenario != "train":
        raise SweepError(f"--{given[0].replace('_', '-')} applies to --scenario train only")
    if "seq_len" in values:
        sweep.seq_lens = parse_list(values["seq_len"], "seq-len", integer=True)
    if "grad_checkpointing" in values:
        v = values["grad_checkpointing"]
        items = [v] if isinstance(v, bool) else v if isinstance(v, list) else parse_list(v, "grad-checkpointing")
        words = {"off": False, "on": True, False: False, True: True}
        bad = [i for i in items if not isinstance(i, (str, bool)) or words.get(i) is None]
        if bad:
            raise SweepError(f"--grad-checkpointing: {bad[0]!r} is not off or on (give off, on or off,on)")
        sweep.grad_checkpointing = list(dict.fromkeys(words[i] for i in items))
    if scenario == "train":
        from bench.sweep import is_checkpoint_dir, model_config

        for m in sweep.models:
            block = model_config(m, sweep.checkpoint or is_checkpoint_dir(m)).block_size
            for n in sweep.seq_lens:
                if n > block:
                    raise SweepError(f"--seq-len {n} exceeds {Path(m).name}'s context length {block}")
    for key in ("train_steps", "warmup_steps"):
        if key in values:
            v = values[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SweepError(f"--{key.replace('_', '-')}: {v!r} must be a positive integer")
            setattr(sweep, key, v)


def cmd_run(args) -> int:
    if args.executor != "ray" and (args.on or args.address):
        raise UsageError(f"--{'on' if args.on else 'address'} goes with --executor ray")
    if args.scenario == "serve":
        if args.executor == "ray":
            raise UsageError("bench run --scenario serve runs on this machine only; --executor ray runs "
                             "inference and train sweeps")
        return cmd_run_serve(args)
    from backends import registry
    from bench.machine import fingerprint
    from bench.roofline import roofline_for
    from bench.store import Store
    from bench.sweep import run_sweep

    sweep = build_sweep(args)
    executor = None
    if args.executor == "ray":
        from bench.ray_executor import RayExecutor, parse_selectors

        selectors = parse_selectors(args.on)
        sweep.backends = registry.names() if sweep.backends == ["all"] else sweep.backends
        for b in sweep.backends:
            registry.get_backend_class(b)
        executor = RayExecutor(sweep.backends, selectors, args.address)
        err.print(f"ray: {len(executor.nodes)} node(s) probed: " + ", ".join(
            f"{n.name} (fingerprint {n.fingerprint_id})" for n in executor.nodes.values()), markup=False)
        probes = executor.probes(sweep.backends)
    elif sweep.backends == ["all"]:
        sweep.backends = registry.names()
        probes = registry.probe_all()
    else:
        for b in sweep.backends:
            registry.get_backend_class(b)  # unknown names fail here, with the valid names
        probes = {b: registry.probe_isolated(b) for b in sweep.backends}
    for n, p in probes.items():
        if not p.available:
            err.print(f"[yellow]not run:[/] {n}: {p.reason}", markup=True)

    store = Store(args.store)
    cache = Path(args.store).parent / "roofline.json"
    if executor is None:
        err.print("[dim]memory bandwidth and matmul peaks: measured once per machine, device and thread count, "
                  "then cached (bench info --remeasure measures again)[/]")
    else:
        err.print("[dim]no roofline on Ray: this machine's would not bound the nodes' cells[/]")

    def roofline(device, threads, precisions):
        return roofline_for(device, threads, precisions, cache=cache)

    fp = fingerprint()
    quiet = args.json
    with _Progress(sweep, quiet) as events:
        # On Ray the cells run on other machines: this one's roofline would bound them wrongly.
        run_id = run_sweep(sweep, store, probes, fp, roofline=None if executor else roofline, name=args.name,
                           resume=args.resume, events=events, executor=executor)
    cells = store.get_run(run_id)["cells"]
    if args.json:
        print(json.dumps(cells, indent=1, default=str))
    elif sweep.scenario == "train":
        out_console().print(train_summary_table(cells))
    else:
        out_console().print(summary_table(cells))
    ran = [c for c in cells if c["status"] != "skipped"]
    failed = [c for c in ran if c["status"] in ("failed", "timeout", "oom")]
    return EXIT_FAILURE if failed and len(failed) == len(ran) else 0


def cmd_run_serve(args) -> int:
    """bench run --scenario serve: a bench serve process per backend and precision, a load point per rate."""
    from backends import registry
    from bench.load import parse_rates, parse_slo, sweep_serve
    from bench.machine import fingerprint
    from bench.store import Store
    from model.gpt import get_config

    if args.config:
        raise UsageError("bench run --scenario serve takes its settings from the command line, not --config")
    if args.option:
        raise UsageError("bench run --scenario serve: --option sweeps inference and train cells only")
    if (args.model is None) == (args.checkpoint is None):
        raise UsageError("bench run --scenario serve: give exactly one of --model PRESET or --checkpoint DIR")
    if args.model is not None:
        get_config(args.model)
    elif not Path(args.checkpoint).is_dir():
        raise UsageError(f"checkpoint directory {args.checkpoint!r} does not exist")
    backends = registry.names() if args.backend in (None, "all") else [b.strip() for b in args.backend.split(",")]
    for b in backends:
        registry.get_backend_class(b)
    precisions = [p.strip() for p in args.precision.split(",")] if args.precision else [None]
    threads = _threads(args.threads)[0] if args.threads else None
    slo = dict(parse_slo(x) for x in args.slo or [])
    cells = []

    def shown(record):
        cells.append(record)
        if record["status"] == "ok":
            line = (f"ok      {record['backend']}/{record['precision']} rate {_rate(record['rate'])}: "
                    f"{record['n_ok']} ok, {record['n_errors']} errors, {_fmt(record['output_tok_s'])} tok/s")
        else:
            line = f"{record['status']:<8}{record['backend']}/{record['precision']} rate {_rate(record['rate'])}: {record['reason']}"
        err.print(line, markup=False)

    run_id = sweep_serve(Store(args.store), fingerprint(), backends=backends, model=args.model,
                         checkpoint=args.checkpoint, precisions=precisions, rates=parse_rates(args.rate),
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


class _Progress:
    """A rich progress bar over every launch of the sweep, and a line per finished launch."""

    def __init__(self, sweep, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        from bench.sweep import Events

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("left"), TimeRemainingColumn())
        self.sweep = sweep
        self.progress = Progress(*columns, console=err, transient=False, disable=quiet and not err.is_terminal)
        self.task = None
        self.events = Events(on_start=self.on_run, on_round=self.on_round, on_launch_start=self.on_start,
                             on_launch_done=self.on_done)

    def __enter__(self):
        self.progress.__enter__()
        return self.events

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def on_run(self, run_id, cells, stored):
        runnable = sum(not c.skip_reason for c in cells)
        planned = runnable * self.sweep.launches
        if stored is not None:
            self.progress.console.print(f"resuming run {run_id}: {stored} of {planned} launches already stored")
        self.progress.console.print(f"run {run_id}: {len(cells)} cells ({len(cells) - runnable} skipped), "
                                    f"{self.sweep.launches} launches each in interleaved rounds")

    def on_round(self, round_, order, reading, left):
        if self.task is None:  # every launch left to run, counted when the first round starts
            self.task = self.progress.add_task("starting", total=left)
        line = f"[bold]round {round_ + 1}[/]: {len(order)} cells in a seeded random order"
        if reading and "decode_ms" in reading:
            line += (f"; sentinel: small decode step {reading['decode_ms']:.3f} ms, "
                     f"gemv {reading['gemv_gb_s']:.1f} GB/s")
        elif reading and reading.get("error"):
            line += f"; {reading['error']}"
        self.progress.console.print(line)

    def on_start(self, cell, round_, number):
        self.progress.update(self.task, description=f"[bold]{cell.spec.label()}[/] launch {number}")

    def on_done(self, cell, launch, record):
        self.progress.advance(self.task)
        status = launch["status"]
        if status == "ok" and record["status"] == "ok" and record.get("scenario") == "train":
            low, high = record.get("train_tok_s_ci") or (None, None)
            ci = f" ({_fmt(low)}–{_fmt(high)})" if low else ""
            line = (f"[green]ok[/]      {cell.spec.label()}: {_fmt(record.get('train_tok_s'))}{ci} "
                    f"training tok/s after {record['launches']} "
                    f"launch{'es' if record['launches'] > 1 else ''}")
        elif status == "ok" and record["status"] == "ok":
            tpot = record.get("tpot_ms") or {}
            ci = ""
            if tpot.get("ci95_low"):
                ci = f" ({_fmt(cell.spec.batch * 1e3 / tpot['ci95_high'])}–{_fmt(cell.spec.batch * 1e3 / tpot['ci95_low'])})"
            line = (f"[green]ok[/]      {cell.spec.label()}: {_fmt(record.get('decode_tok_s'))}{ci} tok/s decode "
                    f"after {record['launches']} launch{'es' if record['launches'] > 1 else ''}")
            if record.get("unsteady"):
                from rich.markup import escape
                line += f" [yellow](unsteady: {escape(record['unsteady'])})[/]"
        else:
            line = f"[yellow]{status:<8}[/]{cell.spec.label()}: {record.get('reason', '')}"
        self.progress.console.print(line)


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def summary_table(cells: list[dict]) -> Table:
    from bench.spec import options_text

    table = Table(title="Results", title_justify="left")
    for col, justify in (("model", "left"), ("backend", "left"), ("prec", "left"), ("batch", "right"),
                         ("threads", "right"), ("status", "left"), ("decode tok/s", "right"),
                         ("95% CI", "right"), ("TPOT ms p50/p90", "right"), ("TTFT ms p50", "right"),
                         ("peak RSS MB", "right"), ("roofline", "right"), ("parity", "left")):
        table.add_column(col, justify=justify)
    for c in cells:
        tpot = c.get("tpot_ms") or {}
        ttft = c.get("ttft_ms") or {}
        ci = "-"
        if tpot.get("ci95_low"):
            ci = f"{c['batch'] * 1e3 / tpot['ci95_high']:,.1f}–{c['batch'] * 1e3 / tpot['ci95_low']:,.1f}"
        parity = c.get("parity")
        p = "-"
        if parity and parity.get("reference"):
            p = "reference"
        elif parity:
            mark = "[green]✓[/]" if parity["passed"] else "[red]✗[/]"
            p = f"{mark} {parity['token_agreement']:.0%} Δ{parity['max_abs_logit_diff']:.1e}"
        status = c["status"] if c["status"] == "ok" else f"[yellow]{c['status']}[/]"
        tpot_txt = f"{_fmt(tpot.get('median'), 2)}/{_fmt(tpot.get('p90'), 2)}" if tpot else "-"
        frac = c.get("roofline_fraction")
        table.add_row(Path(c["model"]).name, c["backend"], (c["precision"] or "-") + options_text(c.get("options")),
                      str(c["batch"]), str(c["threads"] or "default"), status, _fmt(c.get("decode_tok_s")), ci, tpot_txt,
                      _fmt(ttft.get("median"), 2), _fmt(c.get("peak_rss_mb"), 0),
                      "-" if frac is None else f"{frac:.0%}", p)
    return table


def train_summary_table(cells: list[dict]) -> Table:
    table = Table(title="Training results", title_justify="left")
    for col, justify in (("model", "left"), ("backend", "left"), ("prec", "left"), ("batch", "right"),
                         ("seq", "right"), ("ckpt", "left"), ("threads", "right"), ("status", "left"),
                         ("train tok/s", "right"), ("95% CI", "right"), ("step ms p50", "right"),
                         ("activations MB", "right"), ("peak RSS MB", "right"), ("loss before → after", "left")):
        table.add_column(col, justify=justify)
    for c in cells:
        step = c.get("step_ms") or {}
        low, high = c.get("train_tok_s_ci") or (None, None)
        loss = (f"{c['loss_before']:.4f} → {c['loss_after']:.4f}"
                if c.get("loss_before") is not None and c.get("loss_after") is not None else "-")
        status = c["status"] if c["status"] == "ok" else f"[yellow]{c['status']}[/]: {c.get('reason', '')}"
        table.add_row(Path(c["model"]).name, c["backend"], c["precision"] or "-", str(c["batch"]),
                      str(c.get("seq_len")), "on" if c.get("grad_checkpointing") else "off",
                      str(c["threads"] or "default"), status, _fmt(c.get("train_tok_s")),
                      f"{_fmt(low)}–{_fmt(high)}" if low else "-", _fmt(step.get("median"), 1),
                      _fmt(c.get("activation_mb"), 0), _fmt(c.get("peak_rss_mb"), 0), loss)
    return table


# -- bench generate --------------------------------------------------------------------------


def cmd_generate(args) -> int:
    import torch

    from backends import registry
    from model.generate import generate
    from model.gpt import build_model, get_config
    from model.tokenizer import load_tokenizer

    if (args.model is None) == (args.checkpoint is None):
        raise UsageError("bench generate: give exactly one of --model PRESET or --checkpoint DIR")
    if (args.prompt is None) == (args.prompt_ids is None):
        raise UsageError("bench generate: give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if args.max_new_tokens < 0:
        raise UsageError(f"bench generate: --max-new-tokens {args.max_new_tokens} must not be negative")
    registry.get_backend_class(args.backend)
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_dir():
            raise UsageError(f"bench generate: checkpoint directory {args.checkpoint!r} does not exist")
        from bench.quantize import open_model
        model = open_model(args.checkpoint, args.backend, args.precision)  # a quantised one as it is
    else:
        model = build_model(get_config(args.model), seed=args.weights_seed)
    tokenizer = load_tokenizer(args.checkpoint, model.config.vocab_size)
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"bench generate: --prompt-ids {args.prompt_ids!r} is not a comma list of integers")
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("bench generate: the prompt is empty")
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise UsageError(f"bench generate: token id {bad[0]} is outside the vocabulary (0..{model.config.vocab_size - 1})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"bench generate: --temperature {args.temperature} must not be negative (0 is greedy)")
    # Temperature 0 is greedy decoding, as in llama.cpp: sampling's limit as the temperature falls
    # to 0, whatever --top-k or --top-p keep (the most likely token is always kept).
    sampling = args.temperature != 0 and (
        args.temperature is not None or args.top_k is not None or args.top_p is not None)
    if args.greedy and sampling:
        raise UsageError("bench generate: --greedy cannot be combined with --temperature, --top-k or --top-p")
    greedy = not sampling
    temperature = 1.0 if args.temperature is None else args.temperature  # read only when sampling
    with registry.create(args.backend, precision=args.precision, threads=args.threads) as backend:
        probe = backend.probe()
        if not probe.available:
            raise UsageError(f"bench generate: backend {args.backend!r} is unavailable: {probe.reason}"
                             + (f" (fix: {probe.fix})" if probe.fix else ""))
        backend.load(model)
        new = generate(backend, [ids], args.max_new_tokens, greedy=greedy,
                       temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                       seed=args.seed, eos_token_id=tokenizer.eos_token_id,
                       max_length=model.config.block_size)[0]
        precision = backend.precision
    if args.json:
        print(json.dumps(dict(backend=args.backend, precision=precision, prompt_ids=ids, token_ids=new,
                              text=tokenizer.decode(new))))
    else:
        print(tokenizer.decode(ids) + tokenizer.decode(new))
    return 0


# -- bench convert ---------------------------------------------------------------------------


def cmd_convert(args) -> int:
    from model.hf import convert

    out = convert(args.out, to=args.to, preset=args.model, seed=args.seed, checkpoint=args.checkpoint,
                  force=args.force)
    print(out)
    return 0


# -- stored runs -----------------------------------------------------------------------------


def cmd_runs(args) -> int:
    from bench.store import Store

    runs = Store(args.store).list_runs()
    table = Table(title=f"Runs in {args.store}", title_justify="left")
    for col in ("run", "created", "name", "cells", "ok", "fingerprint", "status"):
        table.add_column(col)
    for r in runs:
        table.add_row(r["run_id"], r["created_at"][:19], r.get("name") or "", str(r["n_cells"]), str(r["n_ok"]),
                      r["fingerprint_id"], r.get("status") or "")
    out_console().print(table if runs else "no runs stored yet: try `bench run`")
    return 0


def cmd_export(args) -> int:
    from bench.store import Store, export_csv, export_json

    run = Store(args.store).get_run(args.run)
    text = export_json(run) if args.format == "json" else export_csv(run)
    if args.to:
        from model.storage import is_remote, upload_file

        if not is_remote(args.to):
            raise UsageError(f"bench export: --to {args.to!r} must be s3://bucket/key (--out writes a local file)")
        upload_file(text.encode("utf-8"), args.to, "application/json" if args.format == "json" else "text/csv")
        err.print(f"uploaded {args.to}")
    elif args.out:
        _write(Path(args.out), text)
        err.print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_report(args) -> int:
    from bench.store import Store

    store = Store(args.store)
    runs = [with_training(store, store.get_run(r)) for r in (args.runs or ["latest"])]
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"bench report: cannot create --out {str(out)!r}: {e.strerror or e}") from None
    from reports.html import render_html  # the renderers take stored records only
    from reports.markdown import render_markdown

    written = []
    if args.format in ("md", "both"):
        _write(out / "report.md", render_markdown(runs))
        written.append(out / "report.md")
    if args.format in ("html", "both"):
        _write(out / "report.html", render_html(runs))
        written.append(out / "report.html")
    for p in written:
        print(f"wrote {p}")
    return 0


def with_training(store, run: dict) -> dict:
    """The run with ``training``: the latest training run of each checkpoint its cells measured,
    so the report can show how the model it benchmarks was trained (its loss curve)."""
    dirs = sorted({c["model"] for c in run["cells"] if Path(str(c.get("model"))).is_absolute()})
    found = []
    for d in dirs:
        ids = store.training_runs_for(d, status="finished")
        if ids:
            found.append(store.get_training_run(ids[0]))
    return dict(run, training=found)


def _write(path: Path, text: str) -> None:
    """Write an output file the user named; a path that cannot be written is bad input."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def cmd_compare(args) -> int:
    from bench.compare import compare_runs
    from bench.store import Store
    from reports.compare import compare_markdown, compare_table

    store = Store(args.store)
    result = compare_runs(store.get_run(args.base), store.get_run(args.new), noise_floor_pct=args.noise_floor)
    if not result.environments_match:
        for line in result.fingerprint_diff:
            err.print(f"[yellow]warning: environments differ:[/] {line}")
    if result.drift_warning:
        err.print(f"[yellow]warning:[/] {result.drift_warning}")
    if args.format == "md":
        print(compare_markdown(result))
    else:
        out_console().print(compare_table(result))
    if args.fail_above is not None:
        worse = result.regressions(args.fail_above)
        if worse:
            err.print(f"[red]{len(worse)} cell(s) regressed by more than {args.fail_above}%[/]")
            return EXIT_FAILURE
    return 0


# -- serving -------------------------------------------------------------------------------


def cmd_serve(args) -> int:
    from bench.serve import serve

    serve(args.backend, host=args.host, port=args.port, precision=args.precision, model=args.model,
          checkpoint=args.checkpoint, threads=args.threads, max_batch=args.max_batch, queue_size=args.queue_size,
          timeout_s=args.timeout, drain_s=args.drain_timeout, announce=lambda line: err.print(line, markup=False))
    return 0


def cmd_load(args) -> int:
    from bench.load import LoadSpec, parse_rates, parse_slo, run_and_store
    from bench.machine import fingerprint
    from bench.store import Store

    slo = dict(parse_slo(x) for x in args.slo or [])
    specs = [LoadSpec(url=args.url.rstrip("/"), num_requests=args.num_requests, prompt_len=args.prompt_len,
                      gen_len=args.gen_len, rate=rate, burstiness=args.burstiness,
                      max_concurrency=args.max_concurrency, slo_ms=slo, seed=args.seed, duration_s=args.duration,
                      request_timeout_s=args.request_timeout) for rate in parse_rates(args.rate)]
    store = Store(args.store)
    cells = []

    def shown(record):
        cells.append(record)
        if not args.json:
            err.print(f"rate {_rate(record['rate'])}: {record['n_ok']} ok, {record['n_errors']} errors, "
                      f"{_fmt(record['output_tok_s'])} tok/s", markup=False)

    run_id = run_and_store(specs, store, fingerprint(), name=args.name, on_cell=shown)
    if args.json:
        print(json.dumps(dict(run_id=run_id, cells=cells), indent=1, default=str))
    else:
        out_console().print(load_table(cells, run_id))
    return 0 if any(c["status"] == "ok" for c in cells) else EXIT_FAILURE


def _rate(rate) -> str:
    return "inf" if rate is None else f"{rate:g}"


def load_table(cells: list[dict], run_id: str) -> Table:
    first = cells[0]
    table = Table(title=f"Load run {run_id}: {first['model']} on {first['backend']}/{first['precision']}, "
                        f"max batch {first['batch']}, {first.get('batching')} batching", title_justify="left")
    for col in ("rate req/s", "ok", "errors", "req/s", "out tok/s", "goodput req/s", "TTFT ms p50/p99",
                "TPOT ms p50/p99", "ITL ms p50/p99", "latency ms p50/p99"):
        table.add_column(col, justify="left" if col == "errors" else "right")
    for c in cells:
        def pp(key):
            p = c.get(key) or {}
            return f"{_fmt(p.get('median'), 2)}/{_fmt(p.get('p99'), 2)}" if p else "-"
        errors = ", ".join(f"{n} {k}" for k, n in c["errors"].items()) or "-"
        table.add_row(_rate(c["rate"]), str(c["n_ok"]), errors, _fmt(c["request_throughput"], 2),
                      _fmt(c["output_tok_s"]), _fmt(c["goodput"], 2) if c["slo_ms"] else "-",
                      pp("ttft_pct"), pp("tpot_pct"), pp("itl_pct"), pp("e2e_pct"))
    return table


# -- training and quality --------------------------------------------------------------------


TRAIN_OPTIONS = ("steps", "batch_size", "context", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay",
                 "grad_clip", "precision", "grad_checkpointing", "eval_every", "checkpoint_every", "keep_last",
                 "patience", "seed")


def cmd_train(args) -> int:
    import torch

    from bench.machine import fingerprint
    from bench.store import Store
    from bench.training import train_preset
    from model.gpt import get_config
    from model.train import TrainConfig

    values = _read_config_file(args.config) if args.config else {}
    model = values.pop("model", None)
    overrides = values.pop("model_overrides", {})
    if args.model is not None:
        model = args.model
    if model is None:
        raise UsageError("bench train: give --model PRESET (or model = \"...\" in --config)")
    corpus = values.pop("corpus", None) if args.corpus is None else args.corpus
    max_bytes = values.pop("max_bytes", None) if args.max_bytes is None else args.max_bytes
    for name in TRAIN_OPTIONS:
        given = getattr(args, name, None)
        if given is not None and given is not False:
            values[name] = given
    model_config = get_config(model, **overrides)
    train_config = TrainConfig.from_dict(values)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store(args.store)
    out_dir, uploader = args.out, None
    from model.storage import check_access, is_remote
    if is_remote(args.out):  # trained in a local staging directory, each checkpoint uploaded as written
        from bench.training import RunUploader, remote_staging_dir

        out_dir = remote_staging_dir(args.out)
        if check_access(args.out) and not out_dir.is_dir():
            raise UsageError(f"bench train: {args.out} already holds objects and no run of it is staged on this "
                             f"machine ({out_dir}); nothing was written: choose another prefix")
        uploader = RunUploader(out_dir, args.out,
                               announce=None if args.json else lambda line: err.print(line, markup=False))
        err.print(f"training in {out_dir}, uploading to {args.out}", markup=False, highlight=False)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    # One live line (step, loss, learning rate, tokens/s, ETA); each evaluation is kept on screen.
    live = err.is_terminal and not args.json  # piped (make, CI): one line per evaluation instead
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err,
                  disable=not live) as bar:
        task = bar.add_task("gathering the corpus and training the tokenizer", total=train_config.steps)

        def show(progress):
            bar.update(task, completed=progress.step, description=progress.line())
            if progress.val_loss is not None and not args.json:
                bar.console.print(progress.line(), markup=False, highlight=False)

        summary = train_preset(model_config, train_config, out_dir, store, fingerprint(), corpus_path=corpus,
                               max_bytes=max_bytes, resume=args.resume, name=args.name, on_step=show,
                               on_checkpoint=uploader)
    if uploader is not None:
        summary.update(uploaded=uploader.finish(), remote=args.out)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    elif summary.get("cached"):
        print(f"{args.out}: already trained with this corpus, config and seed (key {summary['key']}); "
              f"best validation loss {_fmt(summary.get('best_val_loss'), 4)}")
    else:
        print(f"{args.out}: {summary['status']} at step {summary['step']}, best validation loss "
              f"{_fmt(summary.get('best_val_loss'), 4)} (step {summary.get('best_step')}), "
              f"{_fmt(summary.get('tokens_per_s'), 0)} tok/s; training run {summary['run_id']}")
    return 0


def _read_config_file(path) -> dict:
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


def cmd_quality(args) -> int:
    import torch

    from backends import registry
    from bench.quality import backend_quality, checkpoint_stream
    from bench.quantize import open_model, reference_model
    from bench.sweep import quantized_target

    if not Path(args.checkpoint).is_dir():
        raise UsageError(f"bench quality: checkpoint directory {args.checkpoint!r} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = registry.names() if args.backend == "all" else [b.strip() for b in args.backend.split(",")]
    targets = []
    for name in backends:
        cls = registry.get_backend_class(name)
        for precision in ([p.strip() for p in args.precision.split(",")] if args.precision
                          else [cls.default_precision]):
            targets.append((name, precision))
    options = _backend_options(args.option or [])
    quantized = quantized_target(args.checkpoint)
    if quantized is not None and quantized[:2] not in targets:
        raise UsageError(f"bench quality: {args.checkpoint} is a quantised checkpoint for --backend {quantized[0]} "
                         f"--precision {quantized[1]}, which is not among those asked for")
    stream = checkpoint_stream(args.checkpoint, corpus_path=args.corpus, max_tokens=args.max_tokens)
    model = reference_model(args.checkpoint)  # a quantised checkpoint's fp32 source
    reference = registry.create("eager")
    reference.load(model)
    results = []
    for name, precision in targets:
        row = dict(backend=name, precision=precision)
        probe = registry.probe_isolated(name)
        cls = registry.get_backend_class(name)
        if not probe.available:
            row.update(status="skipped", reason=f"backend unavailable: {probe.reason}")
        elif precision not in cls.precisions:
            row.update(status="skipped", reason=f"backend {name!r} does not support precision {precision!r}")
        elif quantized is not None and (name, precision) != quantized[:2]:
            row.update(status="skipped", reason=f"the quantised checkpoint runs on {quantized[0]}/{quantized[1]} only")
        else:
            with registry.create(name, precision=precision, threads=args.threads,
                                 **options.get(name, {})) as backend:
                backend.load(open_model(args.checkpoint, name, precision))
                row["backend_info"] = {k: v for k, v in backend.info().items()
                                       if k in ("int8_scheme", "group_size", "block_size", "accuracy_level",
                                                "symmetric", "int4_mode", "ratio", "quantized_checkpoint")}
                is_ref = (name, backend.precision, backend.device) == ("eager", "fp32", "cpu")
                row.update(status="ok", quality=backend_quality(backend, reference, stream, args.context,
                                                                 args.stride or args.context, is_reference=is_ref))
        results.append(row)
        if not args.json:
            err.print(_quality_line(row), markup=False, highlight=False)
    reference.close()
    if args.json:
        print(json.dumps(dict(checkpoint=str(args.checkpoint), stream={k: v for k, v in stream.items() if k != "ids"},
                              results=results), indent=1))
    else:
        out_console().print(quality_table(results, stream))
    return 0


def _quality_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['backend']}/{row['precision']}: {row['status']}: {row['reason']}"
    q = row["quality"]
    return f"{row['backend']}/{row['precision']}: perplexity {q['perplexity']['perplexity']:.3f} ({q['verdict']['verdict']})"


def _backend_options(items: list[str]) -> dict[str, dict]:
    """``BACKEND.KEY=VALUE`` options (``int8.int8_scheme=per_channel``) -> {backend: {key: value}};
    a value that reads as JSON (a number, true/false) is taken as that, else as a string."""
    out: dict[str, dict] = {}
    for item in items:
        name, eq, value = item.partition("=")
        backend, dot, key = name.partition(".")
        if not eq or not dot or not backend or not key:
            raise UsageError(f"--option {item!r}: expected BACKEND.KEY=VALUE, e.g. int8.int8_scheme=per_channel")
        out.setdefault(backend, {})[key] = _option_value(value)
    return out


def _option_value(value: str):
    """A value that reads as JSON (a number, true/false) is taken as that, else as a string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _label(row: dict) -> str:
    opts = row.get("backend_info") or {}
    return row["precision"] + "".join(f" {k}={v}" for k, v in opts.items() if k != "quantized_checkpoint")


def quality_table(results: list[dict], stream: dict) -> Table:
    table = Table(title=f"Quality on {stream['n_ids']:,} tokens of {stream['source']} ({stream['split']})",
                  title_justify="left")
    for col in ("backend", "prec", "perplexity", "bits/byte", "PPL ratio", "mean KL", "KL p99", "same top",
                "RMS Δp", "verdict"):
        table.add_column(col, justify="left" if col in ("backend", "prec", "verdict") else "right")
    for r in results:
        if r["status"] != "ok":
            table.add_row(r["backend"], r["precision"], *["-"] * 7, f"[yellow]{r['status']}[/]: {r['reason']}")
            continue
        q = r["quality"]
        ppl = q["perplexity"]
        d = q.get("divergence")
        verdict = q["verdict"]["verdict"]
        colour = {"pass": "green", "fail": "red", "inconclusive": "yellow"}.get(verdict, "dim")
        if d is None:
            cells = ["reference"] + ["-"] * 4
        else:
            cells = [f"{d['ppl_ratio']:.4f} ± {d['ppl_ratio_se']:.4f}", f"{d['kl_mean']:.2e}", f"{d['kl_p99']:.2e}",
                     f"{100 * d['same_top']:.2f}%", f"{100 * d['dp_rms']:.3f}%"]
        table.add_row(r["backend"], _label(r), f"{ppl['perplexity']:.3f} ± {ppl['perplexity_se']:.3f}",
                      _fmt(ppl.get("bits_per_byte"), 3), *cells, f"[{colour}]{verdict}[/]")
    return table


def cmd_quantize(args) -> int:
    from bench.quantize import quantize_checkpoint

    if not Path(args.checkpoint).is_dir():
        raise UsageError(f"bench quantize: checkpoint directory {args.checkpoint!r} does not exist")
    options = {}
    for item in args.option or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE, e.g. block_size=32")
        options[key] = _option_value(value)
    settings = dict(backend=args.backend, int8_scheme=args.int8_scheme, group_size=args.group_size, options=options)
    from model.storage import check_access, is_remote, upload_checkpoint
    if is_remote(args.out):  # written locally first, uploaded manifest last
        import tempfile

        check_access(args.out)
        with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
            done = quantize_checkpoint(args.checkpoint, args.precision, Path(tmp) / "q", **settings)
            upload_checkpoint(done["out"], args.out)
        done["out"] = args.out
    else:
        done = quantize_checkpoint(args.checkpoint, args.precision, args.out, **settings)
    if args.json:
        print(json.dumps(done, indent=1))
    else:
        group = f", group size {done['group_size']}" if done["group_size"] else ""
        group += "".join(f", {k}={v}" for k, v in done["options"].items() if k not in ("group_size", "block_size"))
        print(f"wrote {done['out']}: {done['backend']}/{done['precision']} {done['scheme']}{group}, "
              f"{done['bytes'] / 2**20:,.2f} MiB (source {done['source_bytes'] / 2**20:,.2f} MiB), "
              f"quantised in {done['quantize_s']:.2f} s; load it with --checkpoint {done['out']} "
              f"--backend {done['backend']} --precision {done['precision']}")
    return 0


# -- the parser ------------------------------------------------------------------------------


def cmd_dashboard(args) -> int:
    """A live, read-only page over the store; the store is opened per request, read-only."""
    import uvicorn

    from bench.compare import compare_runs
    from bench.store import Store
    from reports.dashboard import create_app

    Store(args.store, read_only=True).close()  # a missing or foreign store is one line now, not per request
    if not args.poll > 0:
        raise UsageError(f"bench dashboard: --poll {args.poll} must be a positive number of seconds")
    if not 0 < args.port < 65536:
        raise UsageError(f"bench dashboard: --port {args.port} is not a TCP port (1-65535)")
    app = create_app(lambda: Store(args.store, read_only=True), compare=compare_runs, poll_s=args.poll)
    err.print(f"dashboard of {args.store} at http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    app.state.stopping = lambda: server.should_exit  # open event streams end; pages reconnect to the next server
    server.run()
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _percent(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must not be negative")
    return v


def make_parser() -> argparse.ArgumentParser:
    from bench.store import DEFAULT_STORE

    p = OneLineParser(prog="bench", description="Benchmark one GPT model across hardware backends.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    info = sub.add_parser("info", help="this machine, library versions and every backend's availability")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.add_argument("--no-roofline", action="store_true", help="skip measuring bandwidth and matmul peak")
    info.add_argument("--threads", type=_positive_int, default=None, help="threads for the roofline measurement")
    info.add_argument("--remeasure", action="store_true",
                      help="measure bandwidth and matmul peak again instead of using the cached figures")
    info.set_defaults(fn=cmd_info)

    run = sub.add_parser("run", help="run a sweep of benchmark cells, each in its own process")
    run.add_argument("--config", help="a TOML sweep file; command-line options override it")
    run.add_argument("--model", help="preset names, comma-separated (tiny, small, gpt2, ...)")
    run.add_argument("--checkpoint",
                     help="checkpoint directories or s3://bucket/prefix, comma-separated (instead of --model)")
    run.add_argument("--backend", help="backend names, comma-separated, or 'all' (every available one)")
    run.add_argument("--precision", help="fp32, bf16, fp16, int8, int4, comma-separated (default: each backend's own)")
    run.add_argument("--batch", help="batch sizes: 1,4 or 1-8 or 1-16:x2")
    run.add_argument("--threads", help="thread counts: 1,2 or 1-4; 'all' for one per physical core; 'default' for the libraries' choice")
    run.add_argument("--prompt-len", type=_positive_int, help="prompt tokens per sequence (default 32)")
    run.add_argument("--gen-len", type=_positive_int, help="new tokens per sequence (default 16)")
    run.add_argument("--timeout", type=float, help="seconds before a cell is killed (default 600)")
    run.add_argument("--budget", type=float, help="seconds of measured repetitions per cell (default 20)")
    run.add_argument("--target-ci", type=float, help="stop repeating when the 95%% CI of the median "
                                                     "time per token is this narrow, relative (default 0.05)")
    run.add_argument("--launches", type=_positive_int,
                     help="fresh processes per cell, one per round of interleaved launches (default 3); "
                          "the 95%% interval spans their spread")
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
    run.add_argument("--train-steps", type=_positive_int, help="train: timed steps per launch (default 6)")
    run.add_argument("--warmup-steps", type=_positive_int, help="train: untimed steps before them (default 2)")
    run.add_argument("--store", default=DEFAULT_STORE, help=f"SQLite results store (default {DEFAULT_STORE})")
    run.add_argument("--resume", action="store_true", help="continue the last run of this same sweep")
    run.add_argument("--name", help="a name to remember the run by")
    run.add_argument("--json", action="store_true", help="print the run's cells as a JSON list")
    run.add_argument("--rate", default="1,4,inf", help="serve: request rates, comma-separated (default 1,4,inf)")
    run.add_argument("--num-requests", type=_positive_int, default=32, help="serve: requests per rate (default 32)")
    run.add_argument("--max-batch", type=_positive_int, default=8, help="serve: the server's max batch (default 8)")
    run.add_argument("--slo", action="append", metavar="KIND:MS", help="serve: an SLO for goodput (repeatable)")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="where launches run: this machine (default) or a Ray cluster (pip install '.[ray]')")
    run.add_argument("--address", help="ray: the cluster's address (default RAY_ADDRESS, else the local `ray start`)")
    run.add_argument("--on", action="append", metavar="KEY=VALUE",
                     help="ray: run on nodes with this label (repeatable; BACKEND:KEY=VALUE for one backend's cells)")
    run.set_defaults(fn=cmd_run)

    gen = sub.add_parser("generate", help="generate text with one backend")
    gen.add_argument("--backend", default="eager")
    gen.add_argument("--precision", default=None)
    gen.add_argument("--model", help="a preset (random weights from --seed)")
    gen.add_argument("--checkpoint", help="a checkpoint directory or s3://bucket/prefix")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--greedy", action="store_true", help="greedy decoding (the default without sampling options)")
    gen.add_argument("--temperature", type=float,
                     help="sampling temperature (default 1.0 when sampling); 0 means greedy decoding, as in llama.cpp")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--num-beams", type=_positive_int, default=1)
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (a seed reproduces a sample)")
    gen.add_argument("--weights-seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    gen.add_argument("--threads", type=_positive_int, default=None)
    gen.add_argument("--json", action="store_true", help="print a JSON object with token_ids")
    gen.set_defaults(fn=cmd_generate)

    convert = sub.add_parser("convert", help="write a preset or checkpoint as a local Hugging Face GPT-2 directory")
    convert.add_argument("--to", default="hf", help="the format to write (hf: a Hugging Face GPT-2 directory)")
    convert.add_argument("--out", required=True, help="output directory (must be empty unless --force)")
    convert.add_argument("--model", help="a preset (random weights from --seed)")
    convert.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    convert.add_argument("--checkpoint",
                         help="a checkpoint directory or s3://bucket/prefix (its tokenizer is written too)")
    convert.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    convert.set_defaults(fn=cmd_convert)

    runs = sub.add_parser("runs", help="list stored runs")
    runs.add_argument("--store", default=DEFAULT_STORE)
    runs.set_defaults(fn=cmd_runs)

    export = sub.add_parser("export", help="write a run's cells as JSON or CSV")
    export.add_argument("run", help="a run id, or 'latest'")
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--out", help="a file (default: standard output)")
    export.add_argument("--to", help="upload to s3://bucket/key instead (credentials and endpoint from the AWS "
                                     "environment: AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ENDPOINT_URL, ~/.aws/config)")
    export.add_argument("--store", default=DEFAULT_STORE)
    export.set_defaults(fn=cmd_export)

    report = sub.add_parser("report", help="render runs as Markdown and/or self-contained HTML")
    report.add_argument("runs", nargs="*", help="run ids (default: the latest run)")
    report.add_argument("--format", choices=("md", "html", "both"), default="both")
    report.add_argument("--out", default="runs/report", help="output directory (default runs/report)")
    report.add_argument("--store", default=DEFAULT_STORE)
    report.set_defaults(fn=cmd_report)

    train = sub.add_parser("train", help="train a preset on a local corpus (the standard library by default)")
    train.add_argument("--model", help="preset to train (tiny, small, gpt2, ...)")
    train.add_argument("--config", help="a TOML or JSON file of train settings (and model = \"...\"); options override it")
    train.add_argument("--out", required=True, help="checkpoint directory (a finished run with the same key is reused), "
                                                   "or s3://bucket/prefix: each checkpoint uploaded as it is written")
    train.add_argument("--corpus", help="a text file or directory (default: this Python's standard library sources)")
    train.add_argument("--max-bytes", type=_positive_int, help="keep at most this many bytes of the corpus")
    train.add_argument("--steps", type=_positive_int)
    train.add_argument("--batch-size", type=_positive_int)
    train.add_argument("--context", type=_positive_int)
    train.add_argument("--grad-accum", type=_positive_int)
    train.add_argument("--lr", type=float)
    train.add_argument("--min-lr", type=float)
    train.add_argument("--warmup-steps", type=int)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--grad-clip", type=float)
    train.add_argument("--precision", choices=("fp32", "bf16"))
    train.add_argument("--grad-checkpointing", action="store_true", default=None)
    train.add_argument("--eval-every", type=_positive_int)
    train.add_argument("--checkpoint-every", type=_positive_int)
    train.add_argument("--keep-last", type=_positive_int)
    train.add_argument("--patience", type=int, help="evaluations without a better validation loss before stopping")
    train.add_argument("--seed", type=int)
    train.add_argument("--threads", type=_positive_int, default=None)
    train.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    train.add_argument("--name")
    train.add_argument("--store", default=DEFAULT_STORE)
    train.add_argument("--json", action="store_true")
    train.set_defaults(fn=cmd_train)

    quality = sub.add_parser("quality", help="perplexity and divergence from eager fp32 per backend and precision")
    quality.add_argument("--checkpoint", required=True,
                         help="a trained checkpoint directory or s3://bucket/prefix (bench train --out)")
    quality.add_argument("--backend", default="eager,int8", help="backends, comma-separated, or 'all'")
    quality.add_argument("--precision", help="precisions, comma-separated (default: each backend's own)")
    quality.add_argument("--corpus", help="score this text file's whole text instead of the test split")
    quality.add_argument("--context", type=_positive_int, default=128, help="tokens per window (default 128)")
    quality.add_argument("--stride", type=_positive_int, default=None, help="tokens between windows (default: the context)")
    quality.add_argument("--max-tokens", type=_positive_int, default=None,
                         help="score at most this many tokens, in blocks spread over the stream")
    quality.add_argument("--threads", type=_positive_int, default=None)
    quality.add_argument("--option", action="append", metavar="BACKEND.KEY=VALUE",
                         help="a backend option, repeatable: int8.int8_scheme=per_channel, int8.group_size=32, "
                              "onnxruntime.block_size=32, openvino.int4_mode=sym")
    quality.add_argument("--json", action="store_true",
                         help="print n_tokens, nll_sum, perplexity, bits per byte and the divergence statistics")
    quality.set_defaults(fn=cmd_quality)

    srv = sub.add_parser("serve", help="serve one backend over HTTP: OpenAI-compatible completions, "
                                       "continuous batching, /health and /metrics")
    srv.add_argument("--backend", required=True)
    srv.add_argument("--precision", default=None)
    srv.add_argument("--model", help="a preset (random weights)")
    srv.add_argument("--checkpoint",
                     help="a checkpoint directory or s3://bucket/prefix (its tokenizer serves text prompts)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    srv.add_argument("--max-batch", type=_positive_int, default=8, help="sequences decoded together at most (default 8)")
    srv.add_argument("--queue-size", type=_positive_int, default=64,
                     help="requests that may wait for a batch row; beyond them the server answers 429 (default 64)")
    srv.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, queue included (default 300)")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="seconds a shutdown waits for running requests to finish (default 30)")
    srv.add_argument("--threads", type=_positive_int, default=None)
    srv.set_defaults(fn=cmd_serve)

    load = sub.add_parser("load", help="load a bench serve server (Poisson or gamma arrivals, streaming) and "
                                       "store TTFT, TPOT, ITL, throughput and goodput as serve cells")
    load.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    load.add_argument("--num-requests", type=_positive_int, required=True)
    load.add_argument("--rate", default="inf",
                      help="requests per second, comma-separated for several load points; inf sends all at once "
                           "(default inf)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrival gaps: 1 is Poisson, lower is burstier (default 1)")
    load.add_argument("--max-concurrency", type=_positive_int, default=None, help="requests in flight at most")
    load.add_argument("--prompt-len", type=_positive_int, default=32, help="prompt tokens per request (default 32)")
    load.add_argument("--gen-len", type=_positive_int, default=32, help="tokens generated per request (default 32)")
    load.add_argument("--slo", action="append", metavar="KIND:MS",
                      help="a service-level objective for goodput: ttft:MS, tpot:MS or e2e:MS (repeatable)")
    load.add_argument("--seed", type=int, default=0, help="seed of the arrivals and prompts (default 0)")
    load.add_argument("--duration", type=float, default=600.0,
                      help="seconds one load point may take at most; what is unfinished then is an error (default 600)")
    load.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request, s (default 300)")
    load.add_argument("--store", default=DEFAULT_STORE)
    load.add_argument("--name", help="a name to remember the run by")
    load.add_argument("--json", action="store_true", help="print the run id and cells as JSON")
    load.set_defaults(fn=cmd_load)

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
    quant.add_argument("--group-size", type=_positive_int, default=None,
                       help="int4: weights per scale (default 128; int8 and openvino backends)")
    quant.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="a quantiser option of the backend, repeatable: block_size=32, accuracy_level=4, "
                            "symmetric=true (onnxruntime); int4_mode=sym, ratio=0.8, all_layers=true (openvino)")
    quant.add_argument("--json", action="store_true")
    quant.set_defaults(fn=cmd_quantize)

    compare = sub.add_parser("compare", help="compare two runs cell by cell")
    compare.add_argument("base")
    compare.add_argument("new")
    compare.add_argument("--fail-above", type=_percent, default=None,
                         help="exit 1 when any cell's decode rate regresses by more than this percent")
    compare.add_argument("--noise-floor", type=_percent, default=None,
                         help="percent a change must exceed to count (default: measured from the two runs' "
                              "drift sentinels)")
    compare.add_argument("--format", choices=("table", "md"), default="table")
    compare.add_argument("--store", default=DEFAULT_STORE)
    compare.set_defaults(fn=cmd_compare)

    dash = sub.add_parser("dashboard", help="a live web page over the store: sweeps, training and serving as they run")
    dash.add_argument("--store", default=DEFAULT_STORE)
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    dash.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    dash.add_argument("--poll", type=float, default=0.5, help="seconds between looks at the store (default 0.5)")
    dash.set_defaults(fn=cmd_dashboard)
    return p


def _fetch_remote(args) -> None:
    """Every ``s3://`` checkpoint the command names, replaced by its local cached directory
    (``model.storage``), so each command taking ``--checkpoint`` (and ``bench run --model``)
    reads S3 without knowing it. Downloaded once, verified by digest, cached after."""
    from model.storage import is_remote, localize

    names = ["checkpoint"] + (["model"] if args.command == "run" else [])
    for name in names:
        value = getattr(args, name, None)
        local = localize(value)
        if local != value:
            for uri, path in zip(value.split(","), local.split(",")):
                if is_remote(uri.strip()):
                    err.print(f"{uri.strip()}: verified, cached at {path}", markup=False, highlight=False)
            setattr(args, name, local)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        args = make_parser().parse_args(argv)
        _fetch_remote(args)
        return args.fn(args)
    except (UsageError, InputError) as e:
        # Config, preset, backend, precision, checkpoint, sweep, store and prompt errors.
        err.print(f"error: {e}", markup=False)
        return EXIT_USAGE
    except Exception as e:
        from backends.base import BackendError

        if isinstance(e, BackendError):
            err.print(f"error: {e}", markup=False)
            return EXIT_FAILURE
        traceback.print_exc()
        err.print("error: an unexpected exception, which is a bug in bench; the traceback above says where",
                  markup=False)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        err.print("interrupted: finished cells are already stored (bench run --resume continues)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
