"""The sweep: models x backends x precisions x batches x threads, in interleaved rounds of launches.

``Sweep`` is plain data parsed from the command line or a TOML file. ``plan`` expands it into
typed cells (``bench.spec.CellSpec``), resolving each one's precision, device and roofline
up front and deciding which cannot run (backend unavailable, precision unsupported, not
enough memory), so they are stored as skipped with the reason instead of being tried.

``run_sweep`` runs the rest in *rounds*. Each round visits every cell that still needs a
launch once, in a fresh order drawn from the sweep's seed and the round number (stored with
the round), and each visit is one *launch*: the cell in a fresh process (``bench.cell``), on
this machine or where the executor puts it (``bench.executor``: a Ray cluster's node).
Interleaving is what makes a sweep reproduce: a machine that drifts over minutes slows a
little of every cell instead of all of a few (Google Benchmark's ``--benchmark_enable_random_
interleaving``, asv's A B C ... A' B' C' sampling). At the start of every round the drift
sentinel (``bench.sentinel``) is read. Every launch is committed to the store the moment it
finishes and the cell's record is derived again from its stored launches
(``bench.records.cell_record``), so Ctrl-C or a crash loses nothing finished, and
``--resume`` continues from the last stored launch.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from bench.records import cell_record, skipped_record
from bench.spec import CellSpec
from model.errors import InputError

GiB = 1024**3


MEMORY_HEADROOM = 0.85  # the memory guard: a cell may plan on this share of the free memory, no more


class SweepError(InputError):
    """A sweep that cannot be run as written; the message names the bad value."""


def parse_list(text: str | int | list, what: str, integer: bool = False) -> list:
    """'1,2,4' or '1-4' (inclusive) or '1-16:x2' (doubling) or '2-8:2' (step) -> a list."""
    if isinstance(text, list):
        items = text
    elif isinstance(text, int):
        items = [text]
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                raise SweepError(f"--{what}: empty item in {text!r}")
            if integer and "-" in part[1:]:
                items.extend(_range(part, what))
            else:
                items.append(part)
    if not integer:
        return [str(i) for i in items]
    out = []
    for i in items:
        try:
            value = int(i)
        except (TypeError, ValueError):
            raise SweepError(f"--{what}: {i!r} is not an integer") from None
        if value < 1:
            raise SweepError(f"--{what}: {value} must be at least 1")
        out.append(value)
    return sorted(set(out))


def _range(part: str, what: str) -> list[int]:
    span, _, step = part.partition(":")
    lo, _, hi = span.partition("-")
    try:
        lo, hi = int(lo), int(hi)
        if step.startswith("x"):
            factor, values = int(step[1:]), []
            if factor < 2:
                raise ValueError
            v = lo
            while v <= hi:
                values.append(v)
                v *= factor
            return values
        return list(range(lo, hi + 1, int(step) if step else 1))
    except ValueError:
        raise SweepError(f"--{what}: {part!r} is not a range like 1-8, 2-8:2 or 1-16:x2") from None


@dataclass
class Sweep:
    models: list[str] = field(default_factory=lambda: ["tiny"])
    backends: list[str] = field(default_factory=lambda: ["eager"])
    precisions: list[str] = field(default_factory=list)  # empty: each backend's default
    batches: list[int] = field(default_factory=lambda: [1])
    threads: list[int | None] = field(default_factory=lambda: [None])  # None: the library default
    prompt_len: int = 32
    gen_len: int = 16
    launches: int = 3  # fresh processes per cell, one per round; the interval spans their spread
    timeout_s: float = 600.0
    budget_s: float = 20.0
    target_ci: float = 0.05
    parity: bool = True
    seed: int = 0
    checkpoint: bool = False  # models are checkpoint directories
    quality_tokens: int = 8192  # test tokens a trained checkpoint's quality is measured on (0: none)
    planted_delay: float = 0.0  # testing aid: every step made this fraction slower (see PlantedDelay)
    scenario: str = "inference"  # or "train": training steps (bench.measure_train)
    seq_lens: list[int] = field(default_factory=lambda: [128])  # train: tokens per sequence
    grad_checkpointing: list[bool] = field(default_factory=lambda: [False])  # train
    train_steps: int = 6  # train: timed steps per launch
    warmup_steps: int = 2  # train: untimed steps per launch before them
    # backend options swept: name -> values ({"int8_scheme": ["per_tensor", "per_channel"]}); each
    # backend takes those it has (``backend_option_variants``); empty: every backend's defaults
    options: dict[str, list] = field(default_factory=dict)

    def key(self) -> str:
        """Identifies the sweep for --resume."""
        d = asdict(self)
        if self.scenario == "inference":  # the keys of inference sweeps stay what they were
            for name in TRAIN_ONLY:
                d.pop(name)
        if not self.options:  # and so do those of sweeps without options
            d.pop("options")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


TRAIN_ONLY = ("scenario", "seq_lens", "grad_checkpointing", "train_steps", "warmup_steps")

TOML_KEYS = {"model": "models", "backend": "backends", "precision": "precisions", "batch": "batches",
             "threads": "threads", "prompt_len": "prompt_len", "gen_len": "gen_len",
             "timeout": "timeout_s", "budget": "budget_s", "target_ci": "target_ci", "parity": "parity",
             "seed": "seed", "checkpoint": "checkpoint", "launches": "launches",
             "planted_delay": "planted_delay", "quality_tokens": "quality_tokens",
             "scenario": "scenario", "seq_len": "seq_lens", "grad_checkpointing": "grad_checkpointing",
             "train_steps": "train_steps", "warmup_steps": "warmup_steps", "options": "options"}


def load_toml(path: str | Path) -> dict:
    """The [sweep] table (or the top level) of a TOML file, as CLI-style option values."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep config {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"sweep config {str(path)!r} is not valid TOML: {e}") from None
    if "sweep" in data and isinstance(data.get("options"), dict):  # an [options] table beside [sweep]
        data = dict(data["sweep"], options=data["options"])
    data = data.get("sweep", data)
    unknown = sorted(set(data) - set(TOML_KEYS))
    if unknown:
        raise SweepError(f"sweep config {str(path)!r}: unknown key {unknown[0]!r}; "
                         f"valid keys: {', '.join(TOML_KEYS)}")
    return data


# -- planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """A cell of the plan: its spec, and why it cannot run (empty when it can)."""

    spec: CellSpec
    skip_reason: str = ""
    peak_bytes: int = 0  # the memory guard's estimate of its peak (0: not estimated); executors route by it

    @property
    def key(self) -> str:
        return self.spec.id


def is_checkpoint_dir(name: str) -> bool:
    """A model entry that is not a preset but a directory: a checkpoint (``make bench`` mixes a
    trained ``small`` with the ``gpt2`` preset in one sweep)."""
    from model.gpt import PRESETS

    return name not in PRESETS and Path(name).is_dir()


def model_config(name: str, checkpoint: bool):
    """The config of a preset or a checkpoint directory, without loading its weights."""
    from model.gpt import get_config

    if not checkpoint:
        return get_config(name)
    from model.checkpoint import read_config

    return read_config(name)


def estimate_peak_bytes(config, backend: str, precision: str, batch: int, seq_len: int,
                        prompt_len: int, parity: bool) -> int:
    """A deliberately generous estimate of a cell's peak resident memory.

    The fp32 model is always built first; a backend may then hold a converted copy (at its
    precision) while the fp32 one is still alive; exporters (ONNX, OpenVINO) hold roughly two
    more fp32 copies while tracing and serialising; prefill activations are dominated by the
    attention scores and the MLP; the parity check loads an fp32 reference beside the backend.
    """
    from bench.roofline import kv_cache_bytes, weight_bytes

    fp32 = weight_bytes(config, "fp32")
    converted = weight_bytes(config, precision) if precision != "fp32" else 0
    export = 2 * fp32 if backend in ("onnxruntime", "openvino") else 0
    kv = kv_cache_bytes(config, batch, seq_len, "fp32")
    C, T = config.n_embd, prompt_len
    activations = 4 * batch * T * (config.n_head * T + 8 * C + config.vocab_size)
    reference = fp32 + kv_cache_bytes(config, min(batch, 2), seq_len, "fp32") if parity else 0
    runtime = int(0.8 * GiB)  # torch, runtimes and their arenas, measured empty
    return fp32 + converted + export + 2 * kv + activations + reference + runtime


def estimate_train_peak_bytes(config, precision: str, batch: int, seq_len: int, grad_checkpointing: bool) -> int:
    """A deliberately generous estimate of a training cell's peak resident memory.

    fp32 weights, their gradients and AdamW's two moments (4x the weights; IPEX bf16 adds a
    bf16 copy); activations saved for the backward pass at about 2 * B * T * (34 C + 5 H T)
    bytes a layer in fp32 (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", for 16-bit, doubled), only each block's input (4 B T C bytes) and one
    block's whole set with gradient checkpointing; the logits, their fp32 copy and gradient.
    """
    from bench.roofline import weight_bytes

    fp32 = weight_bytes(config, "fp32")
    state = 4 * fp32 + (fp32 // 2 if precision != "fp32" else 0)
    B, T, C, H, L = batch, seq_len, config.n_embd, config.n_head, config.n_layer
    layer = 2 * B * T * (34 * C + 5 * H * T)
    activations = (L * 4 * B * T * C + layer) if grad_checkpointing else L * layer
    logits = 3 * 4 * B * T * config.vocab_size
    runtime = int(0.8 * GiB)
    return state + activations + logits + runtime


def default_training_precisions(cls, isa: dict | None) -> list[str]:
    """A backend's default training precision and the native reduced ones it also trains in; a
    backend that cannot train gets its inference default, so its cell is stored as skipped, with why."""
    from backends.base import TrainingUnsupported

    try:
        first = cls.check_training(None)
    except TrainingUnsupported:
        return [cls.default_precision]
    native = [p for p in cls.native_precisions(isa or {}) if p in cls.training_precisions]
    return list(dict.fromkeys([first, *native]))


def scenario_variants(sweep: Sweep) -> list[dict]:
    """The scenario's own axes as CellSpec fields: none for inference; sequence length x
    gradient checkpointing for training."""
    if sweep.scenario != "train":
        return [{}]
    return [dict(seq_len=s, grad_checkpointing=g, train_steps=sweep.train_steps, warmup_steps=sweep.warmup_steps)
            for s in sweep.seq_lens for g in sweep.grad_checkpointing]


Roofline = Callable[[str, "int | None", "tuple[str, ...]"], "dict | None"]


def quantized_target(directory: str) -> tuple[str, str, str] | None:
    """(backend, precision, scheme) a quantised checkpoint is for, or None for an fp32 one."""
    from model.qcheckpoint import is_quantized_checkpoint, read_quantized_config

    if not is_quantized_checkpoint(directory):
        return None
    meta = read_quantized_config(directory)[1]
    return meta["backend"], meta["precision"], meta["scheme"]


def takes_option(cls, key: str, precision: str) -> bool:
    """Whether backend class ``cls`` takes option ``key`` at ``precision``: a parameter of its
    constructor, and, for a quantiser option (``cls.precision_options``), one of that precision's."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if key not in params or params[key].kind is inspect.Parameter.VAR_KEYWORD or key in BASE_PARAMETERS:
        return False
    by_precision = getattr(cls, "precision_options", {})
    quantizer = {k for keys in by_precision.values() for k in keys}
    return key not in quantizer or key in by_precision.get(precision, ())


BASE_PARAMETERS = ("self", "precision", "threads", "device", "training")


def backend_option_variants(cls, precision: str, options: dict[str, list]) -> list[dict]:
    """The option sets a backend's cells at ``precision`` run with: every combination of the swept
    options it takes there; one empty set (its defaults, the cell as without options) if none."""
    from itertools import product

    keys = [k for k in options if takes_option(cls, k, precision)]
    return [dict(zip(keys, values)) for values in product(*(options[k] for k in keys))]


def check_option_values(cls, precision: str, options: dict) -> None:
    """Bad option values are bad input, found before anything runs: the backend's own constructor
    (cheap: it validates and stores, loading nothing) is the one judge of them."""
    try:
        cls(precision=precision, **options)
    except (TypeError, ValueError, InputError) as e:
        raise SweepError(f"--option for backend {cls.name!r} at {precision}: {e}") from None


def check_options(sweep: Sweep, classes: dict) -> None:
    """An option that no backend of the sweep takes, at any of its precisions, is a typo: one error."""
    for key in sweep.options:
        if not any(takes_option(cls, key, p) for cls in classes.values()
                   for p in (sweep.precisions or cls.precisions)):
            raise SweepError(f"--option {key}: no backend of this sweep ({', '.join(classes)}) takes it")


def default_precisions(cls, isa: dict | None) -> list[str]:
    """A backend's default precision and the reduced precisions it runs natively on this CPU,
    so a machine with native bf16 (AVX-512 BF16, AMX) has its fastest setting in the default sweep."""
    native = cls.native_precisions(isa or {})
    return list(dict.fromkeys([cls.default_precision, *native]))


def plan(sweep: Sweep, probes: dict, roofline: Roofline | None = None, available_bytes: int | None = None,
         isa: dict | None = None) -> list[Planned]:
    """Every cell of the sweep, typed and resolved, the ones that cannot run marked with the reason.

    ``probes``: backend name -> Probe. ``roofline(device, threads, precisions)``: the bound of
    one device at one thread count (``bench.roofline.roofline_for``), or None: the cells get
    none. ``isa``: the CPU's ISA flags, which pick the default reduced precisions.
    """
    from itertools import product

    from backends import registry
    from backends.base import TrainingUnsupported, UnsupportedPrecision

    train = sweep.scenario == "train"
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    check_options(sweep, {b: registry.get_backend_class(b) for b in sweep.backends})
    cells: list[Planned] = []
    for model in sweep.models:
        checkpoint = sweep.checkpoint or is_checkpoint_dir(model)
        config = model_config(model, checkpoint)
        quantized = quantized_target(model) if checkpoint else None
        seq_len = sweep.prompt_len + sweep.gen_len
        for s in sweep.seq_lens if train else ():
            if s > config.block_size:
                raise SweepError(f"--seq-len {s} exceeds {model}'s context length {config.block_size}")
        if seq_len > config.block_size and not train:
            raise SweepError(f"prompt_len + gen_len = {seq_len} exceeds {model}'s context length "
                             f"{config.block_size}")
        for backend in sweep.backends:
            cls = registry.get_backend_class(backend)
            probe = probes[backend]
            for precision in sweep.precisions or (default_training_precisions if train else default_precisions)(cls, isa):
                for batch in sweep.batches:
                    for threads, variant, options in product(sweep.threads, scenario_variants(sweep),
                                                             backend_option_variants(cls, precision, sweep.options)):
                        spec = CellSpec(**variant, scenario=sweep.scenario, model=model, backend=backend, precision=precision,
                                        device=cls.default_device(), batch=batch, threads=threads,
                                        prompt_len=sweep.prompt_len, gen_len=sweep.gen_len, seed=sweep.seed,
                                        checkpoint=checkpoint, budget_s=sweep.budget_s,
                                        target_ci=sweep.target_ci, parity_steps=8 if sweep.parity else 0,
                                        quality_tokens=sweep.quality_tokens if checkpoint else 0,
                                        planted_delay=sweep.planted_delay, options=options)
                        reason, need = "", 0
                        if not probe.available:
                            reason = f"backend unavailable: {probe.reason}" + (
                                f" (fix: {probe.fix})" if probe.fix else "")
                        else:
                            try:
                                cls.check_training(precision) if train else cls.check_precision(precision)
                            except (UnsupportedPrecision, TrainingUnsupported) as e:
                                reason = str(e)
                        if not reason and options:
                            check_option_values(cls, precision, options)
                        if not reason and quantized is not None and (backend, precision) != quantized[:2]:
                            reason = (f"a quantised checkpoint for {quantized[0]}/{quantized[1]} ({quantized[2]}) "
                                      f"runs on that backend and precision only")
                        if not reason:
                            need = estimate_train_peak_bytes(config, precision, batch, spec.seq_len,
                                                             spec.grad_checkpointing) if train else \
                                estimate_peak_bytes(config, backend, precision, batch, seq_len,
                                                    sweep.prompt_len, sweep.parity)
                            if need > MEMORY_HEADROOM * available:
                                reason = (f"estimated peak memory {need / GiB:.1f} GiB exceeds {MEMORY_HEADROOM:.0%} "
                                          f"of the {available / GiB:.1f} GiB available")
                        cells.append(Planned(spec, reason, need))
    if roofline is not None:
        cells = _attach_rooflines(cells, roofline)
    return cells


def _attach_rooflines(cells: list[Planned], roofline: Roofline) -> list[Planned]:
    """Each runnable cell gets the roofline of its own device and thread count, measured once each."""
    from dataclasses import replace

    wanted: dict[tuple, set] = {}
    for c in cells:
        if not c.skip_reason:
            wanted.setdefault((c.spec.device, c.spec.threads), set()).add(c.spec.precision)
    measured = {k: roofline(k[0], k[1], tuple(sorted(p))) for k, p in wanted.items()}
    return [c if c.skip_reason else replace(c, spec=replace(c.spec, roofline=measured[(c.spec.device, c.spec.threads)]))
            for c in cells]


# -- running ----------------------------------------------------------------------------------


@dataclass
class _CellState:
    """Where one runnable cell stands in a run: its attempt, its launches so far, its stored row."""

    planned: Planned
    n_params: int | None = None  # read once from the preset or checkpoint config
    attempt: int = 0
    launches: list[dict] = field(default_factory=list)  # this attempt's launch records, in order
    row_id: int | None = None

    @property
    def ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.launches)

    @property
    def failed(self) -> bool:
        return any(r["status"] != "ok" for r in self.launches)


@dataclass
class Events:
    """Callbacks the CLI uses to show progress; all optional."""

    on_start: Callable[[str, list[Planned], int | None], None] | None = None  # run id, plan, launches stored
    on_round: Callable[[int, list[Planned], dict | None, int], None] | None = None  # ..., launches left
    on_launch_start: Callable[[Planned, int, int], None] | None = None  # cell, round, launch number
    on_launch_done: Callable[[Planned, dict, dict], None] | None = None  # cell, launch, cell record


def round_order(cells: list[Planned], seed: int, round_: int) -> list[Planned]:
    """The cells in the seeded random order of one round: the same seed and round, the same order."""
    order = sorted(cells, key=lambda c: c.key)
    random.Random(f"{seed}/round/{round_}").shuffle(order)
    return order


def _resume_state(store, run_id: str, states: dict[str, _CellState]) -> int:
    """Load the stored launches of a run into ``states``; returns the next round number.

    A cell whose latest attempt failed starts a new attempt (its stored launches stay in the
    store, kept out of the new record); an ok cell keeps its launches and gets the rest.
    """
    latest = store.latest_cells(run_id)
    for key, (row_id, record) in latest.items():
        if key in states:
            state = states[key]
            state.row_id = row_id
            state.attempt = record.get("attempt", 0)
    for launch in store.launches(run_id):
        state = states.get(launch["key"])
        if state is not None and launch["record"].get("attempt", 0) == state.attempt:
            state.launches.append(launch["record"])
    for state in states.values():
        if state.failed:
            state.attempt += 1
            state.launches, state.row_id = [], None
    rounds = store.rounds(run_id)
    return rounds[-1]["round"] + 1 if rounds else 0


def run_sweep(sweep: Sweep, store, probes: dict, fingerprint: dict, *, roofline: Roofline | None = None,
              name: str | None = None, resume: bool = False, events: Events | None = None,
              sentinel: Callable[[int | None], dict] | None = None, timeout_s: float | None = None,
              executor=None) -> str:
    """Plan the sweep, store it and run it in interleaved rounds; returns the run id.

    ``probes``: backend name -> Probe (unavailable backends become skipped cells with the
    reason). ``fingerprint``: the environment (``bench.machine.fingerprint()``), stored with the
    run; its ISA picks the default reduced precisions. ``roofline``: see ``plan``.
    ``sentinel(threads) -> reading``: the drift sentinel (default ``bench.sentinel.read_isolated``).
    ``executor``: where the launches run (``bench.executor``; default ``LocalExecutor``, this machine).
    A KeyboardInterrupt marks the run interrupted and propagates; every finished launch is stored.
    """
    from bench.executor import Job, LocalExecutor
    from bench.machine import fingerprint_id

    events = events or Events()
    executor = executor or LocalExecutor()
    if sentinel is None:
        from bench.sentinel import read_isolated as sentinel
    cells = executor.place(plan(sweep, probes, roofline, isa=(fingerprint.get("cpu") or {}).get("isa"),
                                available_bytes=executor.available_bytes))
    fingerprint = executor.run_fingerprint(dict(fingerprint, **_rooflines(cells)))
    key = executor.resume_key(sweep.key())
    run_id = store.find_resumable(key, fingerprint_id(fingerprint)) if resume else None
    if run_id is None:
        run_id = store.create_run(fingerprint, dict(sweep.to_dict(), sweep_key=key), name=name)
    else:
        store.reopen_run(run_id)
    states = {c.key: _CellState(c, _n_params(c.spec)) for c in cells if not c.skip_reason}
    next_round = _resume_state(store, run_id, states) if resume else 0
    if events.on_start:
        events.on_start(run_id, cells, sum(s.ok for s in states.values()) if resume else None)
    stored = store.latest_cells(run_id)
    for c in cells:
        if c.skip_reason and c.key not in stored:
            store.add_cell(run_id, skipped_record(c.spec, c.skip_reason, _n_params(c.spec)))
    sentinel_threads = max((t for t in sweep.threads if t), default=None)
    round_ = next_round
    try:
        while True:
            todo = [s.planned for s in states.values() if not s.failed and s.ok < sweep.launches]
            if not todo:
                break
            order = round_order(todo, sweep.seed, round_)
            reading = dict(executor.sentinel(sentinel, sentinel_threads), round=round_)
            store.add_round(run_id, round_, [c.key for c in order], reading)
            if events.on_round:
                left = sum(sweep.launches - s.ok for s in states.values() if not s.failed)
                events.on_round(round_, order, reading, left)
            jobs = [Job(c.key, (c.spec if states[c.key].ok == 0 else c.spec.later_launch()).to_dict(),
                        states[c.key].ok + 1, _launch_fingerprint(states[c.key].launches), c.peak_bytes) for c in order]

            def started(job, round_=round_):
                if events.on_launch_start:
                    events.on_launch_start(states[job.key].planned, round_, job.number)

            for job, launch in executor.run(jobs, timeout_s or sweep.timeout_s, started):
                state = states[job.key]
                cell = state.planned
                launch.update(round=round_, attempt=state.attempt)
                launch.setdefault("sentinel", reading)  # an executor on several machines gives each its own
                store.add_launch(run_id, cell.key, round_, launch)
                state.launches.append(launch)
                record = cell_record(cell.spec, state.launches, sweep.launches, state.n_params)
                record["attempt"] = state.attempt
                record.update(_where(state.launches))
                if state.row_id is None:
                    state.row_id = store.add_cell(run_id, record)
                else:
                    store.update_cell(state.row_id, record)
                if events.on_launch_done:
                    events.on_launch_done(cell, launch, record)
            round_ += 1
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted")
        raise
    finally:
        executor.close()
    store.finish_run(run_id, "finished")
    return run_id


def _launch_fingerprint(launches: list[dict]) -> str | None:
    """The fingerprint id of the machine a cell's launches ran on, when an executor said (None locally)."""
    return next((r["fingerprint_id"] for r in launches if r.get("fingerprint_id")), None)


def _where(launches: list[dict]) -> dict:
    """The measuring machine's fingerprint id and node, for a cell whose launches an executor ran
    elsewhere (reports group cells by it); nothing for local launches, which the run's fingerprint covers."""
    fp = _launch_fingerprint(launches)
    if fp is None:
        return {}
    node = next(r["node"] for r in launches if r.get("fingerprint_id") == fp)
    return dict(fingerprint_id=fp, node=node)


def _rooflines(cells: list[Planned]) -> dict:
    """The rooflines the cells were bounded by, for the run's record: ``rooflines`` maps
    "device/threads=N" to each; ``roofline`` is the CPU's at the most threads (the one a report
    shows in its environment lines)."""
    found = {}
    for c in cells:
        if c.spec.roofline:
            t = "default" if c.spec.threads is None else c.spec.threads
            found[f"{c.spec.device}/threads={t}"] = c.spec.roofline
    cpu = [c.spec for c in cells if c.spec.roofline and c.spec.device == "cpu"]
    top = max(cpu, key=lambda s: s.threads or 0, default=None)
    return dict(rooflines=found, roofline=top.roofline if top else None)


def _n_params(spec: CellSpec) -> int | None:
    try:
        return model_config(spec.model, spec.checkpoint).n_params
    except (OSError, ValueError):  # an unreadable checkpoint: the cell's own launch says why
        return None
