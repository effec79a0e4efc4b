"""The sweep: models x backends x precisions x batches x threads, one isolated cell at a time.

``Sweep`` is plain data parsed from the command line or a TOML file. ``plan`` expands it into
cells, deciding up front which cannot run (backend unavailable, precision unsupported, not
enough memory) so they are recorded as skipped with the reason instead of being tried.
``execute`` runs the rest, each in its own process, and commits each record to the store
the moment it finishes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import psutil

from bench.schema import cell_key

GiB = 1024**3


class SweepError(ValueError):
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
    launches: int = 3  # fresh processes per cell; the interval spans their spread
    timeout_s: float = 600.0
    budget_s: float = 20.0
    target_ci: float = 0.05
    parity: bool = True
    seed: int = 0
    checkpoint: bool = False  # models are checkpoint directories

    def key(self) -> str:
        """Identifies the sweep for --resume."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


TOML_KEYS = {"model": "models", "backend": "backends", "precision": "precisions", "batch": "batches",
             "threads": "threads", "prompt_len": "prompt_len", "gen_len": "gen_len",
             "timeout": "timeout_s", "budget": "budget_s", "target_ci": "target_ci", "parity": "parity",
             "seed": "seed", "checkpoint": "checkpoint", "launches": "launches"}


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
    data = data.get("sweep", data)
    unknown = sorted(set(data) - set(TOML_KEYS))
    if unknown:
        raise SweepError(f"sweep config {str(path)!r}: unknown key {unknown[0]!r}; "
                         f"valid keys: {', '.join(TOML_KEYS)}")
    return data


# -- planning -------------------------------------------------------------------------------


@dataclass
class Cell:
    spec: dict  # a bench.measure.CellSpec as a dict
    skip_reason: str = ""

    @property
    def identity(self) -> dict:
        s = self.spec
        return dict(model=s["model"], backend=s["backend"], precision=s["precision"],
                    device=s.get("device") or "cpu", batch=s["batch"], threads=s["threads"],
                    prompt_len=s["prompt_len"], gen_len=s["gen_len"])

    @property
    def key(self) -> tuple:
        return cell_key(self.identity)

    def label(self) -> str:
        i = self.identity
        t = "default" if i["threads"] is None else i["threads"]
        return f"{i['model']} {i['backend']}/{i['precision']} batch {i['batch']} threads {t}"


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
    fp32 = config.weight_bytes("fp32")
    converted = config.weight_bytes(precision) if precision != "fp32" else 0
    export = 2 * fp32 if backend in ("onnxruntime", "openvino") else 0
    kv = config.kv_cache_bytes(batch, seq_len, "fp32")
    C, T = config.n_embd, prompt_len
    activations = 4 * batch * T * (config.n_head * T + 8 * C + config.vocab_size)
    reference = fp32 + config.kv_cache_bytes(min(batch, 2), seq_len, "fp32") if parity else 0
    runtime = int(0.8 * GiB)  # torch, runtimes and their arenas, measured empty
    return fp32 + converted + export + 2 * kv + activations + reference + runtime


def plan(sweep: Sweep, probes: dict, roofline: dict | None, available_bytes: int | None = None) -> list[Cell]:
    """Every cell of the sweep, the ones that cannot run marked with the reason."""
    from backends import registry
    from backends.base import UnsupportedPrecision

    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    cells = []
    for model in sweep.models:
        config = model_config(model, sweep.checkpoint)
        seq_len = sweep.prompt_len + sweep.gen_len
        if seq_len > config.block_size:
            raise SweepError(f"prompt_len + gen_len = {seq_len} exceeds {model}'s context length "
                             f"{config.block_size}")
        for backend in sweep.backends:
            cls = registry.get_backend_class(backend)
            for precision in sweep.precisions or [cls.default_precision]:
                for batch in sweep.batches:
                    for threads in sweep.threads:
                        spec = dict(model=model, backend=backend, precision=precision, batch=batch,
                                    threads=threads, prompt_len=sweep.prompt_len, gen_len=sweep.gen_len,
                                    device=None, seed=sweep.seed, checkpoint=sweep.checkpoint,
                                    budget_s=sweep.budget_s, target_ci=sweep.target_ci,
                                    parity_steps=8 if sweep.parity else 0, roofline=roofline)
                        cell = Cell(spec)
                        probe = probes[backend]
                        if not probe.available:
                            cell.skip_reason = f"backend unavailable: {probe.reason}" + (
                                f" (fix: {probe.fix})" if probe.fix else "")
                        else:
                            try:
                                cls.check_precision(precision)
                            except UnsupportedPrecision as e:
                                cell.skip_reason = str(e)
                        if not cell.skip_reason:
                            need = estimate_peak_bytes(config, backend, precision, batch, seq_len,
                                                       sweep.prompt_len, sweep.parity)
                            if need > 0.85 * available:
                                cell.skip_reason = (f"estimated peak memory {need / GiB:.1f} GiB exceeds 85% "
                                                    f"of the {available / GiB:.1f} GiB available")
                        cells.append(cell)
    return cells


def record_for(cell: Cell, result: dict, n_params: int | None) -> dict:
    """The stored record: identity first, then what the cell process measured."""
    record = dict(cell.identity, n_params=n_params)
    record.update(result)
    record.setdefault("reason", "")
    return record


def skipped_record(cell: Cell, n_params: int) -> dict:
    return record_for(cell, dict(status="skipped", reason=cell.skip_reason), n_params)


def field_names() -> list[str]:
    return [f.name for f in fields(Sweep)]


def execute(cells: list[Cell], store, run_id: str, timeout_s: float, done_keys: set = frozenset(),
            on_start=None, on_done=None, launches: int = 1) -> list[dict]:
    """Run the cells in order, each ``launches`` times in fresh processes; commit every record as it lands."""
    from bench.cell import run_launches

    records = []
    for cell in cells:
        if cell.key in done_keys:
            continue
        config = model_config(cell.spec["model"], cell.spec["checkpoint"])
        if on_start:
            on_start(cell)
        t = time.perf_counter()
        if cell.skip_reason:
            record = skipped_record(cell, config.n_params)
        else:
            record = record_for(cell, run_launches(cell.spec, timeout_s, launches), config.n_params)
        record.setdefault("wall_s", time.perf_counter() - t)
        store.add_cell(run_id, record)
        records.append(record)
        if on_done:
            on_done(cell, record)
    return records
