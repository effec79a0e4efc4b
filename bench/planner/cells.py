"""Which (backend, precision) pairs run, and the typed cells of a sweep with their memory guard and roofline.

``plan_targets`` is the one rule of what runs, used by sweeps, serve sweeps and ``bench quality``;
``plan`` expands a ``Sweep`` (and its parts) into ``Planned`` cells. Part of the planner
(``bench.planner``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import psutil

from bench.models import is_checkpoint_dir, model_config, quantized_target
from bench.planner.sweeps import Sweep, SweepError, check_lengths
from bench.spec import CellSpec
from model.errors import InputError

GiB = 1024**3


MEMORY_HEADROOM = 0.85  # the memory guard: a cell may plan on this share of the free memory, no more


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


def fastest_candidates(cls, isa: dict | None) -> list[str]:
    """``precision = "fastest"``: the precisions that can be a backend's fastest here: its integer
    ones (int8, int4), and its reduced float precision where the CPU runs one natively (bf16 with
    AVX-512 BF16 or AMX), else its default. fp32 is left out only beside a native bf16 (measured
    on gpt2 at batch 1: bf16 as fast or faster on mkl, ipex and openvino, within 5% on compile)."""
    integer = [p for p in cls.precisions if p in ("int8", "int4")]
    native = cls.native_precisions(isa or {})
    floats = native or ([cls.default_precision] if cls.default_precision not in integer else [])
    return list(dict.fromkeys([*floats, *integer])) or [cls.default_precision]


KEYWORDS = {"all": every_precision, "fastest": fastest_candidates}  # precision = "all" | "fastest"


def plan_targets(backends: list[str], precisions: list[str], probes: Callable[[str], object] | dict, *,
                 isa: dict | None = None, quantized: tuple[str, str, str] | None = None,
                 scenario: str = "inference", defaults: Callable | None = None) -> list[Target]:
    """The (backend, precision) pairs to run, each with the reason it cannot (empty: it runs).

    ``precisions``: asked for; empty: ``defaults(cls, isa)`` (by default each backend's default
    plus the reduced precisions this CPU runs natively); ``["all"]``: ``every_precision``;
    ``["fastest"]``: ``fastest_candidates``.
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
        keyword = KEYWORDS.get(precisions[0]) if len(precisions) == 1 else None
        if quantized is not None and (not precisions or keyword):
            wanted = [quantized[1]]
        elif keyword:
            wanted = keyword(cls, isa)
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
    after_screen: bool = False  # runs only if the screen confirms its (backend, precision, options)

    @property
    def key(self) -> str:
        return self.spec.id


def block_widths(config) -> dict[str, int]:
    """Numbers per token that one block's forward pass makes, by part, for either family.

    ``qkv``: the fused projection's output, C + 2 x kv_dim (grouped-query keys and values are
    narrower than the queries). ``kv_repeat``: the keys and values repeated to n_head heads
    for attention (2 C; none when n_kv_head == n_head). ``mlp``: the MLP's hidden state, the
    GELU's I or SwiGLU's gate and up (2 I) and their product (I). ``residual``: C.
    GPT-2 (I = 4C, no repeat): 3C + 4C + C = 8C.
    """
    C, I, kv = config.n_embd, config.intermediate_size, config.kv_dim
    return dict(qkv=C + 2 * kv, kv_repeat=0 if config.n_kv_head == config.n_head else 2 * C,
                mlp=3 * I if config.mlp == "swiglu" else I, residual=C)


def inference_peak_parts(config, backend: str, precision: str, batch: int, seq_len: int,
                         prompt_len: int, parity: bool) -> dict[str, int]:
    """The parts of ``estimate_peak_bytes``, in bytes, by name (the memory guard's refusal names them)."""
    from bench.machine.roofline import kv_cache_bytes, weight_bytes

    fp32 = weight_bytes(config, "fp32")  # every parameter: SwiGLU's three matrices, an untied head
    T = prompt_len
    width = sum(block_widths(config).values())
    return {
        "fp32 weights": fp32,
        f"{precision} copy": weight_bytes(config, precision) if precision != "fp32" else 0,
        "export": 2 * fp32 if backend in ("onnxruntime", "openvino") else 0,
        "KV cache": 2 * kv_cache_bytes(config, batch, seq_len, "fp32"),  # n_kv_head heads
        "prefill activations": 4 * batch * T * (config.n_head * T + width + config.vocab_size),
        "parity reference": fp32 + kv_cache_bytes(config, min(batch, 2), seq_len, "fp32") if parity else 0,
        "runtime": int(0.8 * GiB),  # torch, runtimes and their arenas, measured empty
    }


def estimate_peak_bytes(config, backend: str, precision: str, batch: int, seq_len: int,
                        prompt_len: int, parity: bool) -> int:
    """A deliberately generous estimate of a cell's peak resident memory.

    The fp32 model is always built first; a backend may then hold a converted copy (at its
    precision) while the fp32 one is still alive; exporters (ONNX, OpenVINO) hold roughly two
    more fp32 copies while tracing and serialising; the KV cache (``n_kv_head`` heads) twice,
    as a step concatenates the new token's; prefill activations are dominated by the attention
    scores (n_head x T a token), one block's widest intermediates (``block_widths``) and the
    logits; the parity check loads an fp32 reference beside the backend.
    """
    return sum(inference_peak_parts(config, backend, precision, batch, seq_len, prompt_len, parity).values())


def saved_activation_width(config) -> int:
    """Bytes per token a block saves for the backward pass at 16 bits, without the attention scores.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
    count 34 h for GPT-2's block; the same count, part by part, for either family:
    attention: its input (2C), q and k (2 (C + kv_dim)), v (2 kv_dim), the output projection's
    input (2C) and a dropout mask (C), plus the keys and values repeated to n_head heads
    (4C) under grouped-query attention; MLP: its input (2C), a mask (C) and the hidden states,
    GELU's input and output (4I) or SwiGLU's gate and up, silu(gate) and the product (8I);
    norms: each of the two saves its input (4C), RMSNorm also its normalised fp32 copy (8C).
    GPT-2 (kv_dim = C, I = 4C): 11C + 19C + 4C = 34C.
    """
    C, I, kv = config.n_embd, config.intermediate_size, config.kv_dim
    attention = 7 * C + 4 * kv + (4 * C if config.n_kv_head != config.n_head else 0)
    mlp = 3 * C + (8 * I if config.mlp == "swiglu" else 4 * I)
    norms = 8 * C if config.norm == "rmsnorm" else 4 * C
    return attention + mlp + norms


def train_peak_parts(config, precision: str, batch: int, seq_len: int, grad_checkpointing: bool) -> dict[str, int]:
    """The parts of ``estimate_train_peak_bytes``, in bytes, by name."""
    from bench.machine.roofline import weight_bytes

    fp32 = weight_bytes(config, "fp32")
    B, T, C, H, L = batch, seq_len, config.n_embd, config.n_head, config.n_layer
    layer = 2 * B * T * (saved_activation_width(config) + 5 * H * T)
    return {
        "weights, gradients and AdamW": 4 * fp32 + (fp32 // 2 if precision != "fp32" else 0),
        "activations": (L * 4 * B * T * C + layer) if grad_checkpointing else L * layer,
        "logits": 3 * 4 * B * T * config.vocab_size,
        "runtime": int(0.8 * GiB),
    }


def estimate_train_peak_bytes(config, precision: str, batch: int, seq_len: int, grad_checkpointing: bool) -> int:
    """A deliberately generous estimate of a training cell's peak resident memory.

    fp32 weights, their gradients and AdamW's two moments (4x the weights; IPEX bf16 adds a
    bf16 copy); activations saved for the backward pass at about 2 * B * T * (W + 5 H T)
    bytes a layer in fp32, W = ``saved_activation_width`` (34 C for GPT-2: Korthikanti et al.
    2022 for 16-bit, doubled), only each block's input (4 B T C bytes) and one block's whole
    set with gradient checkpointing; the logits, their fp32 copy and gradient.
    """
    return sum(train_peak_parts(config, precision, batch, seq_len, grad_checkpointing).values())


def memory_refusal(need: int, available: int, parts: dict[str, int]) -> str:
    """Why a cell does not fit: its estimate, its largest parts, and the memory there is."""
    largest = sorted(((v, k) for k, v in parts.items() if v), reverse=True)[:3]
    named = ", ".join(f"{k} {v / GiB:.1f} GiB" for v, k in largest)
    return (f"estimated peak memory {need / GiB:.1f} GiB (largest parts: {named}) exceeds {MEMORY_HEADROOM:.0%} "
            f"of the {available / GiB:.1f} GiB available")


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


# The training cells' own options (``bench run --scenario train --option lora_rank=0,8``), taken by
# every backend that trains: the rank of LoRA adapters on a frozen base (0: every weight trains).
TRAIN_OPTIONS = ("lora_rank",)


def backend_option_variants(cls, precision: str, options: dict[str, list], scenario: str = "inference") -> list[dict]:
    """The option sets a backend's cells at ``precision`` run with: every combination of the swept
    options it takes there (and in a training sweep, the training options); one empty set (its
    defaults, the cell as without options) if none."""
    from itertools import product

    keys = [k for k in options if takes_option(cls, k, precision) or (scenario == "train" and k in TRAIN_OPTIONS)]
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
        if key in TRAIN_OPTIONS:
            if sweep.scenario != "train":
                raise SweepError(f"--option {key}: an option of training cells; give --scenario train")
            bad = [v for v in sweep.options[key] if not isinstance(v, int) or isinstance(v, bool) or v < 0]
            if bad:
                raise SweepError(f"--option {key}={bad[0]!r}: must be a non-negative integer (0: no adapters)")
            continue
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
                                                         backend_option_variants(cls, precision, sweep.options,
                                                                                 sweep.scenario)):
                    spec = CellSpec(**variant, scenario=sweep.scenario, model=model, backend=backend, precision=precision,
                                    device=cls.default_device(), batch=batch, threads=threads,
                                    prompt_len=sweep.prompt_len, gen_len=sweep.gen_len, seed=sweep.seed,
                                    checkpoint=checkpoint, budget_s=sweep.budget_s,
                                    target_ci=sweep.target_ci, parity_steps=8 if sweep.parity else 0,
                                    quality_tokens=sweep.quality_tokens if checkpoint else 0,
                                    planted_delay=sweep.planted_delay, options=options)
                    reason, need = target.reason, 0
                    if not reason:
                        refusal = cls.model_refusal(config)
                        reason = f"backend {backend!r} cannot run {model}: {refusal}" if refusal else ""
                    backend_options = {k: v for k, v in options.items() if k not in TRAIN_OPTIONS}
                    if not reason and backend_options:
                        check_option_values(cls, precision, backend_options)
                    if not reason:
                        parts = train_peak_parts(config, precision, batch, spec.seq_len,
                                                 spec.grad_checkpointing) if train else \
                            inference_peak_parts(config, backend, precision, batch, seq_len,
                                                 sweep.prompt_len, sweep.parity)
                        need = sum(parts.values())
                        if need > MEMORY_HEADROOM * available:
                            reason = memory_refusal(need, available, parts)
                    cells.append(Planned(spec, reason, need, sweep.after_screen))
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
