"""Compare two runs cell by cell, from their raw samples: what got faster, slower, or only looks different.

Cells are matched by ``cell_id`` (``bench.spec``). For each matched cell, the change of a
latency is the ratio of medians new / base, and its 95% interval comes from the same
hierarchical bootstrap the run's own intervals use (``bench.results.stats.nested_ratio_ci``): each run
is resampled at its own levels, launches and then whole generations, and each draw gives a
ratio of medians. The decode rate is batch / time per output token, so its ratio is the
inverse of the time's.

A change is *significant* when its interval excludes 1 **and** it is larger than the
comparison's noise floor. The floor is measured, not assumed: it is how far the machine itself
moved between the two runs by their drift sentinels (``bench.machine.sentinel``, read at the start of
every round) -- the ratio of the two runs' median sentinel readings, for whichever sentinel
moved most. A cell that moved by less than the whole machine did cannot be told apart from the
machine. Runs stored without sentinel readings fall back to ``FALLBACK_FLOOR_PCT``, and the
comparison says so. When the sentinels differ beyond their spread (the bootstrap interval of
their ratio excludes 1), the machine was measurably faster or slower in one run: the
comparison warns, since every cell's change then carries that drift.

Peak memory is one reading per launch with no useful spread, so it counts as changed only
beyond ``MEMORY_FLOOR_PCT``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.results import stats
from bench.results.schema import diff_fields
from bench.spec import cell_id

FALLBACK_FLOOR_PCT = 2.0
MEMORY_FLOOR_PCT = 5.0
N_BOOT = 1000

FASTER, SLOWER, SAME, NOT_COMPARABLE = "faster", "slower", "no significant change", "not comparable"

# metric -> (what it is called in tables, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "decode_tok_s": ("decode tok/s", True),
    "ttft_ms": ("TTFT ms", False),
    "tpot_ms": ("TPOT ms", False),
    "peak_rss_mb": ("peak MiB", False),
}
# sentinel reading -> higher is better
SENTINEL_KINDS = {"decode_ms": False, "gemv_gb_s": True}


def _is_ok(cell: dict) -> bool:
    return cell.get("status") == "ok"


@dataclass(frozen=True)
class MetricChange:
    metric: str
    base: float | None
    new: float | None
    ratio: float | None  # new / base
    low: float | None  # interval of the ratio
    high: float | None
    higher_is_better: bool
    significant: bool

    @property
    def change(self) -> float | None:
        """Relative change, new / base - 1."""
        return None if self.ratio is None else self.ratio - 1

    @property
    def improved(self) -> bool | None:
        """Whether a significant change is for the better; None when not significant."""
        if not self.significant or self.ratio is None:
            return None
        return (self.ratio > 1) == self.higher_is_better


def _samples(cell: dict, kind: str):
    """A cell's raw samples of one kind as launches > generations > values, or None.

    A cell record stores ``tpot_ms`` as launches > generations > steps and the per-generation
    kinds (``ttft_ms``, ``e2e_ms``) as launches > generations; records from before launches
    were stored flat, which reads as one launch.
    """
    samples = (cell.get("samples") or {}).get(kind)
    if not samples:
        return None
    if kind != "tpot_ms" and stats.depth(samples) == 2:
        return stats.per_generation(samples)
    return stats.nest(samples)


def _ratio(base: dict, new: dict, kind: str, seed: int) -> tuple[float, float | None, float | None] | None:
    """(ratio, low, high) of a latency's median, from raw samples where both cells have them,
    else from the stored intervals (the most pessimistic and optimistic pairing of the two)."""
    b, n = _samples(base, kind), _samples(new, kind)
    if b is not None and n is not None:
        return stats.nested_ratio_ci(b, n, n_boot=N_BOOT, seed=seed)
    bs, ns = base.get(kind), new.get(kind)
    if not (isinstance(bs, dict) and isinstance(ns, dict)) or not (stats.finite(bs.get("median"))
                                                                     and stats.finite(ns.get("median"))):
        return None
    ratio = ns["median"] / bs["median"]
    lo_hi = (bs.get("ci95_low"), bs.get("ci95_high"), ns.get("ci95_low"), ns.get("ci95_high"))
    if not all(stats.finite(x) and x > 0 for x in lo_hi):
        return ratio, None, None
    b_lo, b_hi, n_lo, n_hi = lo_hi
    return ratio, n_lo / b_hi, n_hi / b_lo


def compare_metric(base: dict, new: dict, metric: str, floor_pct: float, seed: int = 0) -> MetricChange:
    higher = METRICS[metric][1]
    if metric == "peak_rss_mb":
        b, n = base.get(metric), new.get(metric)
        if not (stats.finite(b) and stats.finite(n)) or b <= 0:
            return MetricChange(metric, b, n, None, None, None, higher, False)
        ratio = n / b
        return MetricChange(metric, b, n, ratio, None, None, higher, abs(ratio - 1) * 100 >= MEMORY_FLOOR_PCT)
    kind = "tpot_ms" if metric == "decode_tok_s" else metric
    got = _ratio(base, new, kind, seed)
    shown = lambda c: c.get(metric) if metric == "decode_tok_s" else (c.get(metric) or {}).get("median")  # noqa: E731
    if got is None:
        return MetricChange(metric, shown(base), shown(new), None, None, None, higher, False)
    ratio, low, high = got
    if metric == "decode_tok_s":  # a rate: the inverse of the time's ratio
        ratio, low, high = 1 / ratio, (None if high is None else 1 / high), (None if low is None else 1 / low)
    significant = low is not None and (low > 1 or high < 1) and abs(ratio - 1) * 100 >= floor_pct
    return MetricChange(metric, shown(base), shown(new), ratio, low, high, higher, significant)


@dataclass(frozen=True)
class CellChange:
    key: str
    base: dict
    new: dict
    metrics: dict[str, MetricChange]
    verdict: str
    note: str = ""  # why not comparable, or a change in parity

    @property
    def decode(self) -> MetricChange:
        return self.metrics["decode_tok_s"]


def compare_cell(base: dict, new: dict, floor_pct: float, seed: int = 0) -> CellChange:
    key = base.get("cell_id") or cell_id(base)
    if not (_is_ok(base) and _is_ok(new)):
        if _is_ok(base):
            note = f"new {new.get('status')}: {new.get('reason') or 'no reason recorded'}"
        elif _is_ok(new):
            note = f"base {base.get('status')}, now ok"
        elif base.get("status") == new.get("status"):
            note = f"{new.get('status')} in both"
        else:
            note = f"base {base.get('status')}, new {new.get('status')}: {new.get('reason') or 'no reason'}"
        return CellChange(key, base, new, {m: compare_metric({}, {}, m, floor_pct) for m in METRICS},
                          NOT_COMPARABLE, note)
    if "train" in (base.get("scenario"), new.get("scenario")):  # its samples are step times, not generations
        return CellChange(key, base, new, {m: compare_metric({}, {}, m, floor_pct) for m in METRICS},
                          NOT_COMPARABLE, "a training cell: bench compare judges inference cells only so far")
    metrics = {m: compare_metric(base, new, m, floor_pct, seed) for m in METRICS}
    d = metrics["decode_tok_s"]
    verdict = SAME if not d.significant else FASTER if d.ratio > 1 else SLOWER
    bp, np_ = base.get("parity"), new.get("parity")
    note = ""
    if isinstance(bp, dict) and isinstance(np_, dict) and bp.get("passed") != np_.get("passed"):
        note = "parity now passes" if np_.get("passed") else "parity now fails"
    return CellChange(key, base, new, metrics, verdict, note)


# -- the drift sentinel ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Drift:
    """How the machine moved between two runs, by their sentinels: one entry per sentinel kind."""

    shifts: dict[str, tuple[float, float, float]]  # kind -> (ratio new / base, low, high), "slower" > 1
    floor_pct: float  # the noise floor this implies
    source: str  # how the floor was set, in words
    warning: str | None  # set when the sentinels differ beyond their spread


def readings(run: dict, kind: str) -> list[float]:
    """A run's sentinel readings of one kind, in round order."""
    out = []
    for r in run.get("rounds") or []:
        s = r.get("sentinel") or {}
        if stats.finite(s.get(kind)) and s[kind] > 0:
            out.append(float(s[kind]))
    return out


def sentinel_drift(base: dict, new: dict, seed: int = 0) -> Drift:
    """The drift between two runs by their sentinel readings, and the noise floor it sets.

    Each kind's shift is expressed as a slowdown ratio (> 1: the machine was slower in the new
    run), with a bootstrap interval over the rounds' readings of each run. The floor is the
    largest |ratio - 1| of the kinds.
    """
    shifts = {}
    for kind, higher_is_better in SENTINEL_KINDS.items():
        b, n = readings(base, kind), readings(new, kind)
        if not b or not n:
            continue
        if higher_is_better:  # a rate: its inverse is the slowdown
            b, n = [1 / x for x in b], [1 / x for x in n]
        ratio = float(np.median(n) / np.median(b))
        if len(b) > 1 and len(n) > 1:
            _, low, high = stats.ratio_ci(b, n, n_boot=N_BOOT, seed=seed)
        else:
            low = high = ratio  # one reading each: no spread to speak of
        shifts[kind] = (ratio, low, high)
    if not shifts:
        return Drift({}, FALLBACK_FLOOR_PCT, f"fixed at {FALLBACK_FLOOR_PCT:g}%: a run has no sentinel readings",
                     None)
    floor = 100 * max(abs(ratio - 1) for ratio, _, _ in shifts.values())
    words = {"decode_ms": "decode step", "gemv_gb_s": "gemv bandwidth"}
    parts = [f"{words[k]} {_pct(r)} ({_pct(lo)} to {_pct(hi)})" for k, (r, lo, hi) in shifts.items()]
    source = f"measured: how far the machine moved between the runs by their sentinels ({'; '.join(parts)})"
    moved = [k for k, (_, lo, hi) in shifts.items() if lo > 1 or hi < 1]
    warning = None
    if moved:
        warning = ("the machine itself changed speed between the runs, beyond the sentinels' spread: "
                   + "; ".join(f"{words[k]} {_pct(shifts[k][0])} slower" if shifts[k][0] > 1
                               else f"{words[k]} {_pct(1 / shifts[k][0])} faster" for k in moved)
                   + "; every cell's change carries this drift")
    return Drift(shifts, floor, source, warning)


def _pct(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%".replace("-", "−")


# -- whole runs -----------------------------------------------------------------------------------


def fingerprint_diff(base: dict, new: dict) -> list[str]:
    """Every differing field, as 'field: base -> new'; lists as the items added and removed.

    The measured rooflines (bandwidth, peak rates) are left out: they are measurements of the
    machine, different in every run, not part of its identity.
    """
    return diff_fields(base, new, skip_prefixes=("roofline.", "rooflines.", "nodes.", "executor."))


@dataclass(frozen=True)
class Comparison:
    base_run: str
    new_run: str
    cells: tuple[CellChange, ...]  # matched cells, in report order
    only_base: tuple[dict, ...]
    only_new: tuple[dict, ...]
    fingerprint_diff: tuple[str, ...]  # 'field: base -> new'
    environments_match: bool  # equal fingerprint ids: the harness calls the results comparable
    noise_floor_pct: float
    noise_floor_source: str = ""
    drift_warning: str | None = None
    memory_floor_pct: float = MEMORY_FLOOR_PCT

    def by_verdict(self, verdict: str) -> list[CellChange]:
        return [c for c in self.cells if c.verdict == verdict]

    def regressions(self, threshold_pct: float) -> list[CellChange]:
        """Cells whose decode rate got significantly slower by more than ``threshold_pct`` percent."""
        if not stats.finite(threshold_pct) or threshold_pct < 0:
            raise ValueError(f"threshold_pct={threshold_pct!r} must be a percentage >= 0")
        return [c for c in self.by_verdict(SLOWER) if -c.decode.change * 100 > threshold_pct]

    def broken(self) -> list[CellChange]:
        """Cells that ran in base and have no result in new (skipped, failed, timeout, oom): not
        regressions in speed, but a CI gate should look at them too."""
        return [c for c in self.cells if _is_ok(c.base) and not _is_ok(c.new)]


def order_key(cell: dict) -> tuple:
    """Deterministic order: model size, then the identity fields."""
    def nl(x):
        return (x is None, x if x is not None else 0)
    return (nl(cell.get("n_params")), str(cell.get("model")), str(cell.get("backend")),
            str(cell.get("precision")), nl(cell.get("batch")), nl(cell.get("threads")),
            nl(cell.get("prompt_len")), nl(cell.get("gen_len")))


def _cells(run: dict, name: str) -> dict[str, dict]:
    if not isinstance(run, dict) or not isinstance(run.get("cells"), list):
        raise ValueError(f"{name} run {run.get('run_id') if isinstance(run, dict) else run!r} "
                         "has no 'cells' list; is it a run record?")
    return {c.get("cell_id") or cell_id(c): c for c in run["cells"]}  # a later duplicate wins


def _machine(cell: dict, run: dict) -> str | None:
    """The fingerprint id of the machine that measured a cell: its own (a Ray node's), else its run's."""
    return cell.get("fingerprint_id") or run.get("fingerprint_id")


def _machine_fingerprint(cell: dict, run: dict) -> dict:
    fp = run.get("fingerprint") or {}
    return (fp.get("nodes") or {}).get(cell.get("fingerprint_id"), fp) if cell.get("fingerprint_id") else fp


def compare_runs(base: dict, new: dict, noise_floor_pct: float | None = None, seed: int = 0) -> Comparison:
    """Match the cells of two runs and judge each change against both runs' raw samples.

    ``noise_floor_pct``: None (the default) measures it from the runs' sentinels; a number
    overrides it (and the comparison says it was given).
    """
    if noise_floor_pct is not None and (not stats.finite(noise_floor_pct) or noise_floor_pct < 0):
        raise ValueError(f"noise_floor_pct={noise_floor_pct!r} must be a percentage >= 0")
    a, b = _cells(base, "base"), _cells(new, "new")
    drift = sentinel_drift(base, new, seed)
    if noise_floor_pct is None:
        floor, source = drift.floor_pct, drift.source
    else:
        floor, source = noise_floor_pct, f"given: {noise_floor_pct:g}%"
    diff = fingerprint_diff(base.get("fingerprint") or {}, new.get("fingerprint") or {})
    ids = base.get("fingerprint_id"), new.get("fingerprint_id")
    matches = ids[0] == ids[1] if all(ids) else not diff  # without ids (hand-made records), by the fields
    matched = sorted((k for k in a if k in b), key=lambda k: order_key(a[k]))
    apart = next((k for k in matched if _machine(a[k], base) != _machine(b[k], new)), None)
    if apart is not None:  # cells measured on Ray nodes: their own machines must match, not the drivers'
        matches = False
        diff = fingerprint_diff(_machine_fingerprint(a[apart], base), _machine_fingerprint(b[apart], new)) or diff
    return Comparison(
        str(base.get("run_id")), str(new.get("run_id")),
        tuple(compare_cell(a[k], b[k], floor, seed) for k in matched),
        tuple(sorted((a[k] for k in a if k not in b), key=order_key)),
        tuple(sorted((b[k] for k in b if k not in a), key=order_key)),
        tuple(diff), matches, floor, source, drift.warning)
