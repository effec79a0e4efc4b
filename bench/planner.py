"""The one planner: what a command will run, decided and validated before anything is measured.

Every command that plans work asks here: ``bench run`` (inference and train sweeps),
``bench run --scenario serve`` and ``bench quality``. The planner

- parses a sweep from command-line values or a TOML file (``sweep_from_values``, ``load_toml``)
  and validates every value, length and path in it, so bad input is one line and exit 2 before
  a probe, a roofline or a cell has run;
- decides which (backend, precision) pairs run (``plan_targets``): each backend's default
  precision plus the reduced ones this CPU runs natively, or ``precision = "all"`` (every
  precision the backend runs here, its int8 and int4 included), an unavailable backend or an
  unsupported precision kept as a skipped target with the reason, and a quantised checkpoint
  planned on its own backend and precision only (the others skipped, saying why);
- expands a sweep into typed cells (``plan``: ``bench.spec.CellSpec``), each with its memory
  guard estimate and roofline, the ones that cannot run marked with the reason, so they are
  stored as skipped instead of being tried.

Running the plan is ``bench.sweep.run_sweep``'s job. Imports ``bench.spec``, ``bench.models``,
``backends`` and ``model``; nothing of the harness above it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from bench.models import is_checkpoint_dir, model_config, quantized_target
from bench.spec import SCENARIOS, CellSpec
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
    # 0: every cell gets all its launches. N: a screen first: every cell runs one launch, then only
    # the N fastest of each model x batch x threads (passing parity and quality), the fastest peer
    # and eager fp32 (the reference) get the rest; the others keep one launch, marked in the record
    confirm: int = 0
    timeout_s: float = 600.0
    budget_s: float = 20.0
    target_ci: float = 0.05
    parity: bool = True
    seed: int = 0
    checkpoint: bool = False  # models are checkpoint directories
    quality_tokens: int = 8192  # test tokens a trained checkpoint's quality is measured on (0: none)
    planted_delay: float = 0.0  # testing aid: every step made this fraction slower (see PlantedDelay)
    scenario: str = "inference"  # or "train": training steps (bench.scenarios.train)
    seq_lens: list[int] = field(default_factory=lambda: [128])  # train: tokens per sequence
    grad_checkpointing: list[bool] = field(default_factory=lambda: [False])  # train
    train_steps: int = 6  # train: timed steps per launch
    warmup_steps: int = 2  # train: untimed steps per launch before them
    # backend options swept: name -> values ({"int8_scheme": ["per_tensor", "per_channel"]}); each
    # backend takes those it has (``backend_option_variants``); empty: every backend's defaults
    options: dict[str, list] = field(default_factory=dict)
    # more parts of the same run (a TOML [[sweep.also]] table each): their own models, backends,
    # precisions, batches or threads, planned with this one and run interleaved with it
    also: list[Sweep] = field(default_factory=list)

    def key(self) -> str:
        """Identifies the sweep for --resume."""
        d = asdict(self)
        if self.scenario == "inference":  # the keys of inference sweeps stay what they were
            for name in TRAIN_ONLY:
                d.pop(name)
        if not self.options:  # and so do those of sweeps without options
            d.pop("options")
        if not self.also:  # and of sweeps in one part
            d.pop("also")
        if not self.confirm:  # and of sweeps without a screen
            d.pop("confirm")
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
             "train_steps": "train_steps", "warmup_steps": "warmup_steps", "options": "options",
             "also": "also", "confirm": "confirm"}
# What a whole run shares, so an [[sweep.also]] part may not set it: its launches, rounds and limits.
RUN_KEYS = ("launches", "confirm", "timeout", "seed", "scenario", "planted_delay", "parity")


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


# -- a sweep from command-line or TOML values ---------------------------------------------------


def parse_threads(text) -> list:
    """Thread counts: '1,2', '1-4', 'default' (the libraries' own choice) or 'all' (one per
    physical core this process may use, ``bench.machine.environment.all_threads``), also inside a list ('1,all')."""
    from bench.machine.environment import all_threads

    if text in ("default", "auto"):
        return [None]
    cores = str(all_threads())
    items = text if isinstance(text, list) else str(text).split(",")
    items = [cores if str(i).strip() == "all" else i for i in items]
    return parse_list(items if isinstance(text, list) else ",".join(map(str, items)), "threads", integer=True)


def option_value(value: str):
    """A value that reads as JSON (a number, true/false) is taken as that, else as a string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_options(items: list[str], *, example: str, per_backend: bool = False, parse: bool = True) -> dict:
    """``KEY=VALUE`` items (repeatable ``--option``) -> {key: value}; with ``per_backend``,
    ``BACKEND.KEY=VALUE`` -> {backend: {key: value}}. A value reads as JSON where it can
    (``parse``), else as a string. A malformed item is bad input naming it and an example."""
    out: dict = {}
    for item in items:
        name, eq, value = item.partition("=")
        name = name.strip()
        backend, dot, key = name.partition(".") if per_backend else ("", ".", name)
        if not eq or not key or not value.strip() or (per_backend and not (dot and backend)):
            raise SweepError(f"--option {item!r}: expected {'BACKEND.KEY' if per_backend else 'KEY'}=VALUE, "
                             f"e.g. {example}")
        target = out.setdefault(backend, {}) if per_backend else out
        target[key] = option_value(value) if parse else value
    return out


def option_axis(table) -> dict[str, list]:
    """The swept options from --option or a TOML [options] table: each a list of values, a value that
    reads as JSON (32, true) taken as that; "a,b" and ["a", "b"] alike."""
    if not isinstance(table, dict):
        raise SweepError(f"options must be a table of option = values, not {table!r}")
    out = {}
    for key, value in table.items():
        items = value if isinstance(value, list) else parse_list(value, f"option {key}") if isinstance(value, str) \
            else [value]
        values = [option_value(v) if isinstance(v, str) else v for v in items]
        if not values:
            raise SweepError(f"--option {key}: no values")
        out[key] = list(dict.fromkeys(values))
    return out


def _positive_int(values: dict, key: str) -> int | None:
    if key not in values:
        return None
    v = values[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise SweepError(f"--{key.replace('_', '-')}: {v!r} must be a positive integer")
    return v


def sweep_from_values(values: dict, *, model_flag: bool = False) -> Sweep:
    """A validated ``Sweep`` from CLI-style values (``load_toml``'s, with the command line's laid
    over them). ``model_flag``: --model was given on the command line (with a checkpoint, a conflict).
    Every model is resolved and every length checked against its context here."""
    from backends.base import PRECISIONS

    sweep = Sweep()
    if values.get("checkpoint"):
        if values.get("model") and model_flag:
            raise SweepError("give --model or --checkpoint, not both")
        dirs = parse_list(values["checkpoint"], "checkpoint") if not isinstance(values["checkpoint"], bool) \
            else parse_list(values["model"], "model")
        for d in dirs:
            if not Path(d).is_dir():
                raise SweepError(f"checkpoint directory {d!r} does not exist")
        sweep.models, sweep.checkpoint = [str(Path(d).resolve()) for d in dirs], True
    elif "model" in values:
        sweep.models = parse_list(values["model"], "model")
        for i, m in enumerate(sweep.models):
            if is_checkpoint_dir(m):  # a trained checkpoint beside the presets
                sweep.models[i] = str(Path(m).resolve())
            elif "/" in m:
                raise SweepError(f"checkpoint directory {m!r} does not exist (make bench trains it: "
                                 f"bench train --config sweeps/train-small.toml --out {m})")
            else:
                model_config(m, False)  # unknown presets fail here, with the valid names
    if "backend" in values:
        sweep.backends = expand_backends(parse_list(values["backend"], "backend"))
    if "precision" in values:
        sweep.precisions = parse_list(values["precision"], "precision")
        if sweep.precisions != ["all"]:
            for p in sweep.precisions:
                if p not in PRECISIONS:
                    raise SweepError(f"--precision: unknown precision {p!r}; valid: {', '.join(PRECISIONS)} or all")
    if "batch" in values:
        sweep.batches = parse_list(values["batch"], "batch", integer=True)
    if "threads" in values:
        sweep.threads = parse_threads(values["threads"])
    for key in ("prompt_len", "gen_len", "launches"):
        v = _positive_int(values, key)
        if v is not None:
            setattr(sweep, key, v)
    for key, attr in (("timeout", "timeout_s"), ("budget", "budget_s"), ("target_ci", "target_ci")):
        if key in values:
            v = values[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise SweepError(f"--{key.replace('_', '-')}: {v!r} must be a positive number")
            setattr(sweep, attr, float(v))
    if "planted_delay" in values:
        v = values["planted_delay"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 10:
            raise SweepError(f"--plant-slowdown: {v!r} must be a fraction between 0 and 10")
        sweep.planted_delay = float(v)
    if "parity" in values:
        sweep.parity = bool(values["parity"])
    if "seed" in values:
        sweep.seed = int(values["seed"])
    if "confirm" in values:
        v = values["confirm"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SweepError(f"confirm: {v!r} must be a whole number of cells (0: no screen)")
        sweep.confirm = v
    if "quality_tokens" in values:
        v = values["quality_tokens"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SweepError(f"quality_tokens: {v!r} must be a whole number of tokens (0: none)")
        sweep.quality_tokens = v
    _train_axes(sweep, values)
    if "options" in values:
        sweep.options = option_axis(values["options"])
    check_quantized_targets(sweep)
    check_lengths(sweep)
    return sweep


def expand_backends(names: list[str]) -> list[str]:
    """Backend names with ``all`` (every registered backend), ``ours`` (every one but the peers)
    and ``peers`` (what a user would run instead) spelled out; an unknown name lists the valid ones."""
    from backends import registry

    out: list[str] = []
    for name in names:
        if name == "all":
            out += registry.names()
        elif name in ("ours", "peers"):
            out += [n for n in registry.names() if registry.is_peer(n) == (name == "peers")]
        else:
            registry.get_backend_class(name)
            out.append(name)
    return list(dict.fromkeys(out))


def sweep_from_config(values: dict, given: dict | None = None, *, model_flag: bool = False) -> Sweep:
    """A sweep from a config file's values (``load_toml``) with the command line's (``given``)
    laid over them. Each ``[[sweep.also]]`` part inherits the top level's values, sets its own
    models, backends, precisions, batches, threads or lengths, and takes the command line's too;
    what the whole run shares (``RUN_KEYS``) is set at the top only."""
    values, given = dict(values), dict(given or {})
    parts = values.pop("also", [])
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise SweepError("also must be a list of tables, each a [[sweep.also]] table")
    sweep = sweep_from_values(dict(values, **given), model_flag=model_flag)
    for i, part in enumerate(parts, 1):
        unknown = sorted(set(part) - set(TOML_KEYS))
        if unknown:
            raise SweepError(f"[[sweep.also]] table {i}: unknown key {unknown[0]!r}; valid keys: "
                             f"{', '.join(k for k in TOML_KEYS if k not in RUN_KEYS and k != 'also')}")
        shared = [k for k in part if k in RUN_KEYS or k == "also"]
        if shared:
            raise SweepError(f"[[sweep.also]] table {i}: {shared[0]!r} applies to the whole run; set it in [sweep]")
        sweep.also.append(sweep_from_values({**values, **part, **given}, model_flag=model_flag))
    return sweep


def all_backends(sweep: Sweep) -> list[str]:
    """Every backend of the sweep and its parts, in order of appearance."""
    return list(dict.fromkeys(b for part in (sweep, *sweep.also) for b in part.backends))


def _train_axes(sweep: Sweep, values: dict) -> None:
    """--scenario and the training axes (--seq-len, --grad-checkpointing, --train-steps, --warmup-steps)."""
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
    for key in ("train_steps", "warmup_steps"):
        v = _positive_int(values, key)
        if v is not None:
            setattr(sweep, key, v)


def check_lengths(sweep: Sweep) -> None:
    """Every model's context holds the sweep's sequences: prompt + generation for inference, each
    --seq-len for training. Read from the configs alone, before anything is measured."""
    for model in sweep.models:
        config = model_config(model, sweep.checkpoint or is_checkpoint_dir(model))
        name = Path(model).name
        if sweep.scenario == "train":
            for s in sweep.seq_lens:
                if s > config.block_size:
                    raise SweepError(f"--seq-len {s} exceeds {name}'s context length {config.block_size}")
        elif sweep.prompt_len + sweep.gen_len > config.block_size:
            raise SweepError(f"prompt_len + gen_len = {sweep.prompt_len + sweep.gen_len} exceeds {name}'s "
                             f"context length {config.block_size}")


def check_quantized_targets(sweep: Sweep) -> None:
    """A quantised checkpoint named with backends (not 'all') none of which reads it is bad input."""
    from backends import registry

    if sweep.backends == ["all"]:
        return
    for model in sweep.models:
        target = quantized_target(model) if (sweep.checkpoint or is_checkpoint_dir(model)) else None
        if target is None:
            continue
        if target[0] in sweep.backends and (not sweep.precisions or sweep.precisions == ["all"]
                                            or target[1] in sweep.precisions):
            continue
        registry.get_backend_class(target[0])
        raise SweepError(f"{model}: a quantised checkpoint for --backend {target[0]} --precision {target[1]} "
                         f"({target[2]}); it is never dequantised to run elsewhere")


def check_store(path: str | Path) -> Path:
    """The results store's file can be created or opened for writing: checked before anything runs."""
    import os

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise SweepError(f"--store {str(path)!r} is a directory; give a file such as runs/bench.sqlite")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise SweepError(f"--store {str(path)!r}: {str(existing)!r} is not a directory")
    where = path if path.exists() else existing
    if not os.access(where, os.W_OK):
        raise SweepError(f"--store {str(path)!r}: {str(where)!r} is not writable")
    return path


# -- which backends and precisions run --------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A (backend, precision) pair a command will run, or the reason it will not (empty: it runs)."""

    backend: str
    precision: str
    reason: str = ""


def unavailable_reason(probe) -> str:
    return f"backend unavailable: {probe.reason}" + (f" (fix: {probe.fix})" if probe.fix else "")


def every_precision(cls, isa: dict | None) -> list[str]:
    """``precision = "all"``: every precision a backend runs on this machine: its default, the
    reduced float precisions the CPU runs natively, and its integer ones (int8, int4)."""
    integer = [p for p in cls.precisions if p in ("int8", "int4")]
    return list(dict.fromkeys([cls.default_precision, *cls.native_precisions(isa or {}), *integer]))


def plan_targets(backends: list[str], precisions: list[str], probes: Callable[[str], object] | dict, *,
                 isa: dict | None = None, quantized: tuple[str, str, str] | None = None,
                 scenario: str = "inference", defaults: Callable | None = None) -> list[Target]:
    """The (backend, precision) pairs to run, each with the reason it cannot (empty: it runs).

    ``precisions``: asked for; empty: ``defaults(cls, isa)`` (by default each backend's default
    plus the reduced precisions this CPU runs natively); ``["all"]``: ``every_precision``.
    ``probes``: backend name -> Probe, or a function giving it (probed only when needed).
    ``quantized``: a quantised checkpoint's (backend, precision, scheme): it runs there only; the
    other backends are planned as one skipped target each, saying why.
    """
    from backends import registry
    from backends.base import TrainingUnsupported, UnsupportedPrecision

    train = scenario == "train"
    defaults = defaults or (default_training_precisions if train else default_precisions)
    probe_of = probes.get if isinstance(probes, dict) else probes
    out: list[Target] = []
    for backend in backends:
        cls = registry.get_backend_class(backend)
        if quantized is not None and backend != quantized[0]:
            out.append(Target(backend, cls.default_precision,
                              f"a quantised checkpoint for {quantized[0]}/{quantized[1]} ({quantized[2]}) runs on "
                              f"that backend and precision only"))
            continue
        if quantized is not None and (not precisions or precisions == ["all"]):
            wanted = [quantized[1]]
        elif precisions == ["all"]:
            wanted = every_precision(cls, isa)
        else:
            wanted = precisions or defaults(cls, isa)
        probe = probe_of(backend)
        for precision in wanted:
            reason = ""
            if probe is not None and not probe.available:
                reason = unavailable_reason(probe)
            else:
                try:
                    cls.check_training(precision) if train else cls.check_precision(precision)
                except (UnsupportedPrecision, TrainingUnsupported) as e:
                    reason = str(e)
            if not reason and quantized is not None and (backend, precision) != quantized[:2]:
                reason = (f"a quantised checkpoint for {quantized[0]}/{quantized[1]} ({quantized[2]}) runs on "
                          f"that backend and precision only")
            out.append(Target(backend, precision, reason))
    return out



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


def estimate_peak_bytes(config, backend: str, precision: str, batch: int, seq_len: int,
                        prompt_len: int, parity: bool) -> int:
    """A deliberately generous estimate of a cell's peak resident memory.

    The fp32 model is always built first; a backend may then hold a converted copy (at its
    precision) while the fp32 one is still alive; exporters (ONNX, OpenVINO) hold roughly two
    more fp32 copies while tracing and serialising; prefill activations are dominated by the
    attention scores and the MLP; the parity check loads an fp32 reference beside the backend.
    """
    from bench.machine.roofline import kv_cache_bytes, weight_bytes

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
    from bench.machine.roofline import weight_bytes

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
    one device at one thread count (``bench.machine.roofline.roofline_for``), or None: the cells get
    none. ``isa``: the CPU's ISA flags, which pick the default reduced precisions.
    """
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    cells: dict[str, Planned] = {}
    for part in (sweep, *sweep.also):  # a cell two parts share is planned once
        for cell in _plan_part(part, probes, available, isa):
            cells.setdefault(cell.key, cell)
    out = list(cells.values())
    return _attach_rooflines(out, roofline) if roofline is not None else out


def _plan_part(sweep: Sweep, probes: dict, available: int, isa: dict | None) -> list[Planned]:
    from itertools import product

    from backends import registry

    train = sweep.scenario == "train"
    check_options(sweep, {b: registry.get_backend_class(b) for b in sweep.backends})
    check_lengths(sweep)
    cells: list[Planned] = []
    for model in sweep.models:
        checkpoint = sweep.checkpoint or is_checkpoint_dir(model)
        config = model_config(model, checkpoint)
        quantized = quantized_target(model) if checkpoint else None
        seq_len = sweep.prompt_len + sweep.gen_len
        for target in plan_targets(sweep.backends, sweep.precisions, probes, isa=isa, quantized=quantized,
                                   scenario=sweep.scenario):
            backend, precision = target.backend, target.precision
            cls = registry.get_backend_class(backend)
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
                    reason, need = target.reason, 0
                    if not reason and options:
                        check_option_values(cls, precision, options)
                    if not reason:
                        need = estimate_train_peak_bytes(config, precision, batch, spec.seq_len,
                                                         spec.grad_checkpointing) if train else \
                            estimate_peak_bytes(config, backend, precision, batch, seq_len,
                                                sweep.prompt_len, sweep.parity)
                        if need > MEMORY_HEADROOM * available:
                            reason = (f"estimated peak memory {need / GiB:.1f} GiB exceeds {MEMORY_HEADROOM:.0%} "
                                      f"of the {available / GiB:.1f} GiB available")
                    cells.append(Planned(spec, reason, need))
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


