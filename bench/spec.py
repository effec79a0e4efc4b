"""What one benchmark cell is: the typed spec that travels from the plan to the stored record.

A *cell* is one point of a sweep: model x backend x precision x device x batch x threads x
lengths. The planner resolves everything a cell's identity depends on before anything runs
(the backend's default precision, its device), so the spec that runs, the launches it
leaves in the store and the merged record all carry the same identity, and ``--resume`` and
``bench compare`` match cells by it. ``cell_id`` is the one identity function: every stored
record carries its result as ``record["cell_id"]``, so readers (``reports/``) match cells
without knowing which fields make the identity.

Backend options (``int8_scheme=per_channel``, ``block_size=32``) are part of the identity when a
cell has any: two cells that differ only in options measure different things. A cell without
options keeps the id it had before options were an axis, so stored runs still match.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

# The identity of a cell: two cells with equal identity measure the same thing.
IDENTITY_FIELDS = ("model", "backend", "precision", "device", "batch", "threads", "prompt_len", "gen_len")

# What a cell measures. "inference" is a generation (time to first token, time per output
# token); other scenarios add the fields that make their cells distinct to the identity.
SCENARIOS = ("inference", "serve", "train")
# "serve": a load run against bench serve (bench.scenarios.load); batch is the server's max batch, and the
# offered load (request rate, None for all at once; burstiness; concurrency cap; request count)
# makes one load point distinct from another.
SCENARIO_FIELDS: dict[str, tuple[str, ...]] = {
    "inference": (),
    "serve": ("rate", "burstiness", "max_concurrency", "num_requests"),
    "train": ("seq_len", "grad_checkpointing"),
}


def cell_id(record: dict) -> str:
    """The identity of a cell (a spec or a record) as a string: equal strings, same cell.

    An inference cell's id is its identity fields alone, as it was before scenarios existed,
    so stored runs keep comparing with new ones; another scenario's id leads with its name.
    """
    scenario = record.get("scenario") or "inference"
    values = [record.get(f) for f in IDENTITY_FIELDS]
    options = [{"options": record["options"]}] if record.get("options") else []  # none: the id as it was
    if scenario == "inference":
        return json.dumps([*values, *options], sort_keys=True)
    return json.dumps([scenario, *values, *(record.get(f) for f in SCENARIO_FIELDS[scenario]), *options],
                      sort_keys=True)


def options_text(options: dict | None) -> str:
    """' int8_scheme=per_channel block_size=32' for a cell's backend options; '' for none."""
    return "".join(f" {k}={v}" for k, v in sorted((options or {}).items()))


@dataclass(frozen=True)
class CellSpec:
    """Everything a cell process needs, JSON-ready (it crosses a process boundary)."""

    # identity: resolved by the planner, never None for precision and device
    model: str  # a preset name, or a checkpoint directory
    backend: str
    precision: str
    device: str
    batch: int = 1
    threads: int | None = None  # None: the libraries' own default
    prompt_len: int = 32
    gen_len: int = 16
    scenario: str = "inference"  # one of SCENARIOS; its SCENARIO_FIELDS join the identity
    # serve: the offered load (bench.scenarios.load)
    rate: float | None = None  # requests per second; None: all at once
    burstiness: float | None = None  # the gamma shape of the arrival gaps; 1 is Poisson
    max_concurrency: int | None = None  # requests in flight at most; None: no cap
    num_requests: int | None = None
    seq_len: int = 128  # train: tokens per sequence of a training batch
    grad_checkpointing: bool = False  # train: recompute each block's activations in the backward pass
    # how it is measured
    seed: int = 0
    checkpoint: bool = False  # model is a checkpoint directory
    min_warmup: int = 1
    max_warmup: int = 5
    min_reps: int = 5  # generations per launch at least: fewer leave the within-launch spread unknown
    max_reps: int = 30
    target_ci: float = 0.05  # a launch stops when its 95% interval of the median tpot is this narrow
    budget_s: float = 20.0  # time for one launch's measured generations
    parity_steps: int = 8  # 0: no parity check (later launches, --no-parity)
    measure_kv: bool = True  # size the KV cache after a full generation (later launches skip it)
    quality_tokens: int = 0  # a trained checkpoint's quality on this many test tokens (first launch; 0: none)
    planted_delay: float = 0.0  # testing aid: each step also spins for this fraction of its own time
    roofline: dict | None = None  # the bandwidth and peaks that bound this cell (its device and threads)
    options: dict = field(default_factory=dict)  # backend options
    train_steps: int = 6  # train: measured optimizer steps per launch (fewer when budget_s runs out)
    warmup_steps: int = 2  # train: steps before measuring (the first creates the optimizer's state)
    group_steps: int = 2  # train: consecutive measured steps the bootstrap resamples as one group

    def __post_init__(self):
        for name in ("batch", "prompt_len", "gen_len", "seq_len", "train_steps", "warmup_steps", "group_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads={self.threads!r} must be a positive integer or None")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario={self.scenario!r} is not one of {', '.join(SCENARIOS)}")
        if not isinstance(self.grad_checkpointing, bool):
            raise ValueError(f"grad_checkpointing={self.grad_checkpointing!r} must be true or false")
        if not 0.0 <= self.planted_delay < 10.0:
            raise ValueError(f"planted_delay={self.planted_delay!r} must be a fraction in [0, 10)")

    @property
    def id(self) -> str:
        return cell_id(asdict(self))

    def identity(self) -> dict:
        fields_ = IDENTITY_FIELDS + SCENARIO_FIELDS[self.scenario]
        identity = {"scenario": self.scenario, **{f: getattr(self, f) for f in fields_}}
        if self.options:
            identity["options"] = dict(self.options)
        return identity

    def label(self) -> str:
        threads = "default" if self.threads is None else self.threads
        model = self.model.rstrip("/").rsplit("/", 1)[-1] if self.checkpoint else self.model
        device = "" if self.device == "cpu" else f" on {self.device}"
        train = ""
        if self.scenario == "train":
            train = f" train seq {self.seq_len} ckpt {'on' if self.grad_checkpointing else 'off'}"
        return (f"{model} {self.backend}/{self.precision}{options_text(self.options)}{device} batch {self.batch}"
                f"{train} threads {threads}")

    def later_launch(self) -> CellSpec:
        """The spec of a launch after the cell's first: parity, quality and the KV-cache size
        are properties of the cell, not of the process, so they are measured once."""
        return replace(self, parity_steps=0, measure_kv=False, quality_tokens=0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CellSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"cell spec has unknown fields: {', '.join(unknown)}")
        return cls(**d)
