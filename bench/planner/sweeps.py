"""A sweep as plain data: parsed from the command line or a TOML file, every value validated.

``Sweep`` is models x backends x precisions x batches x threads (and a training sweep's axes),
with ``[[sweep.also]]`` parts run in the same run. ``sweep_from_config`` lays the command line
over a file's values; each check here (lengths against the model's context, quantised
checkpoints against the backends named, the store's path) runs before anything is probed or
measured. Part of the planner (``bench.planner``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.models import is_checkpoint_dir, is_gguf_file, model_config, quantized_target
from bench.spec import SCENARIOS
from model.errors import InputError


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
    # the N fastest of each model x batch x threads that pass parity and quality (ours or peers)
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
    # a part whose cells wait for the screen (confirm = N): only the (backend, precision) pairs it
    # confirmed run there (the finalists at another batch, or on another model); the others are
    # stored as skipped, screened out
    after_screen: bool = False

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
        if not self.after_screen:
            d.pop("after_screen")
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
             "also": "also", "confirm": "confirm", "after_screen": "after_screen"}
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
            if not Path(d).exists():
                raise SweepError(f"checkpoint directory {d!r} does not exist")
            if not (Path(d).is_dir() or is_gguf_file(d)):
                raise SweepError(f"checkpoint {d!r} is neither a directory nor a .gguf file")
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
        if sweep.precisions not in (["all"], ["fastest"]):
            for p in sweep.precisions:
                if p not in PRECISIONS:
                    raise SweepError(f"--precision: unknown precision {p!r}; valid: {', '.join(PRECISIONS)}, "
                                     f"all or fastest")
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
    if "after_screen" in values:
        if not isinstance(values["after_screen"], bool):
            raise SweepError(f"after_screen: {values['after_screen']!r} must be true or false")
        sweep.after_screen = values["after_screen"]
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
    if sweep.after_screen:
        raise SweepError("after_screen belongs to an [[sweep.also]] part: the [sweep] table is the screen")
    if any(p.after_screen for p in sweep.also) and not sweep.confirm:
        raise SweepError("after_screen needs a screen: set confirm = N in [sweep]")
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
    """Every quantised checkpoint of the sweep is asked for on its own backend and precision."""
    for model in sweep.models:
        if sweep.checkpoint or is_checkpoint_dir(model):
            check_quantized_request(model, sweep.backends, sweep.precisions)


def check_quantized_request(model: str, backends: list[str], precisions: list[str]) -> None:
    """A quantised checkpoint runs on the backend and precision it was made for, never dequantised:
    asking for it with backends none of which reads it (or a precision it is not) is bad input."""
    target = quantized_target(model)
    if target is None:
        return
    if target[0] in backends and (not precisions or precisions in (["all"], ["fastest"]) or target[1] in precisions):
        return
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
