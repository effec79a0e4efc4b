"""Compare two runs cell by cell: what got faster, what got slower, and what only looks different.

Cells are matched by ``bench.schema.cell_key``. For each matched cell and metric the result is
the ratio new / base with an interval built from both runs' 95% intervals of the median:

    ratio interval = [new_low / base_high, new_high / base_low]

i.e. the most pessimistic and most optimistic pairing of the two intervals. The ratio interval
excludes 1 exactly when the two intervals do not overlap, a conservative test (stricter than 95%
on the difference), chosen because it needs nothing but the stored statistics and is the same
every time it is computed. A change is *significant* when the interval excludes 1 **and** the
change exceeds a noise floor (``noise_floor_pct``, 2% by default): on a shared machine, medians
move by a percent or so between runs without any cause in the code.

The per-cell verdict follows the decode rate (tokens/s), the headline number: "faster",
"slower", "no significant change", or "not comparable" when either run has no result for the
cell. Peak memory is one reading per cell with no spread, so it counts as changed only beyond
``MEMORY_FLOOR_PCT``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.schema import cell_key, diff_fields
from reports.format import decode_interval, is_ok, label, num, signed_pct, sort_key, threads_label
from reports.markdown import md_escape

NOISE_FLOOR_PCT = 2.0
MEMORY_FLOOR_PCT = 5.0

FASTER, SLOWER, SAME, NOT_COMPARABLE = "faster", "slower", "no significant change", "not comparable"

# metric -> (what it is called in tables, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "decode_tok_s": ("decode tok/s", True),
    "ttft_ms": ("TTFT ms", False),
    "tpot_ms": ("TPOT ms", False),
    "peak_rss_mb": ("peak MiB", False),
}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def estimate(cell: dict, metric: str) -> tuple[float | None, float | None, float | None]:
    """(value, ci95 low, ci95 high) of a metric in a cell; the bounds are None without a spread."""
    if metric == "decode_tok_s":
        return (cell.get("decode_tok_s"), *decode_interval(cell))
    v = cell.get(metric)
    if isinstance(v, dict):  # a statistics dict: its median and the median's interval
        return v.get("median"), v.get("ci95_low"), v.get("ci95_high")
    return v, None, None


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


def compare_metric(base: dict, new: dict, metric: str, noise_floor_pct: float) -> MetricChange:
    b, b_lo, b_hi = estimate(base, metric)
    n, n_lo, n_hi = estimate(new, metric)
    higher = METRICS[metric][1]
    if not (_finite(b) and _finite(n)) or b <= 0:
        return MetricChange(metric, b, n, None, None, None, higher, False)
    ratio = n / b
    if all(_finite(x) for x in (b_lo, b_hi, n_lo, n_hi)) and b_lo > 0:
        low, high = n_lo / b_hi, n_hi / b_lo
        significant = (low > 1 or high < 1) and abs(ratio - 1) * 100 >= noise_floor_pct
    else:  # one reading, no spread: only a change beyond the memory floor counts
        low = high = None
        significant = metric == "peak_rss_mb" and abs(ratio - 1) * 100 >= MEMORY_FLOOR_PCT
    return MetricChange(metric, b, n, ratio, low, high, higher, significant)


@dataclass(frozen=True)
class CellChange:
    key: tuple
    base: dict
    new: dict
    metrics: dict[str, MetricChange]
    verdict: str
    note: str = ""  # why not comparable, or a change in parity

    @property
    def decode(self) -> MetricChange:
        return self.metrics["decode_tok_s"]


def compare_cell(base: dict, new: dict, noise_floor_pct: float) -> CellChange:
    key = cell_key(base)
    if not (is_ok(base) and is_ok(new)):
        if is_ok(base):
            note = f"new {new.get('status')}: {new.get('reason') or 'no reason recorded'}"
        elif is_ok(new):
            note = f"base {base.get('status')}, now ok"
        elif base.get("status") == new.get("status"):
            note = f"{new.get('status')} in both"
        else:
            note = f"base {base.get('status')}, new {new.get('status')}: {new.get('reason') or 'no reason'}"
        return CellChange(key, base, new, {m: compare_metric({}, {}, m, noise_floor_pct) for m in METRICS},
                          NOT_COMPARABLE, note)
    metrics = {m: compare_metric(base, new, m, noise_floor_pct) for m in METRICS}
    d = metrics["decode_tok_s"]
    verdict = SAME if not d.significant else FASTER if d.ratio > 1 else SLOWER
    bp, np_ = base.get("parity"), new.get("parity")
    note = ""
    if isinstance(bp, dict) and isinstance(np_, dict) and bp.get("passed") != np_.get("passed"):
        note = "parity now passes" if np_.get("passed") else "parity now fails"
    return CellChange(key, base, new, metrics, verdict, note)


def fingerprint_diff(base: dict, new: dict) -> list[str]:
    """Every differing field, as 'field: base -> new'; lists as the items added and removed.

    The measured roofline (bandwidth, peak rates) is left out: it is a measurement of the
    machine, different in every run, not part of its identity.
    """
    return diff_fields(base, new, skip_prefixes=("roofline.",))


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

    def by_verdict(self, verdict: str) -> list[CellChange]:
        return [c for c in self.cells if c.verdict == verdict]

    def regressions(self, threshold_pct: float) -> list[CellChange]:
        """Cells whose decode rate got significantly slower by more than ``threshold_pct`` percent."""
        if not _finite(threshold_pct) or threshold_pct < 0:
            raise ValueError(f"threshold_pct={threshold_pct!r} must be a percentage >= 0")
        return [c for c in self.by_verdict(SLOWER) if -c.decode.change * 100 > threshold_pct]

    def broken(self) -> list[CellChange]:
        """Cells that ran in base and have no result in new (skipped, failed, timeout, oom): not
    regressions in speed, but a CI gate should look at them too."""
        return [c for c in self.cells if is_ok(c.base) and not is_ok(c.new)]


def _cells(run: dict, name: str) -> dict[tuple, dict]:
    if not isinstance(run, dict) or not isinstance(run.get("cells"), list):
        raise ValueError(f"{name} run {run.get('run_id') if isinstance(run, dict) else run!r} "
                         "has no 'cells' list; is it a run record?")
    return {cell_key(c): c for c in run["cells"]}  # a later duplicate wins, as after --resume


def compare_runs(base: dict, new: dict, noise_floor_pct: float = NOISE_FLOOR_PCT) -> Comparison:
    """Match the cells of two runs and judge each change against both runs' spread."""
    if not _finite(noise_floor_pct) or noise_floor_pct < 0:
        raise ValueError(f"noise_floor_pct={noise_floor_pct!r} must be a percentage >= 0")
    a, b = _cells(base, "base"), _cells(new, "new")
    diff = fingerprint_diff(base.get("fingerprint") or {}, new.get("fingerprint") or {})
    ids = base.get("fingerprint_id"), new.get("fingerprint_id")
    # Without ids (hand-made records), judge by the fields themselves.
    matches = ids[0] == ids[1] if all(ids) else not diff
    matched = sorted((k for k in a if k in b), key=lambda k: sort_key(a[k]))
    return Comparison(
        str(base.get("run_id")), str(new.get("run_id")),
        tuple(compare_cell(a[k], b[k], noise_floor_pct) for k in matched),
        tuple(sorted((a[k] for k in a if k not in b), key=sort_key)),
        tuple(sorted((b[k] for k in b if k not in a), key=sort_key)),
        tuple(diff),
        matches, noise_floor_pct)


# --- rendering ---------------------------------------------------------------------------------

def change_text(m: MetricChange) -> str:
    """'−12.3% (−14.0% to −10.5%)'; the change alone without an interval."""
    if m.ratio is None:
        return "—"
    if m.low is None:
        return signed_pct(m.change)
    return f"{signed_pct(m.change)} ({signed_pct(m.low - 1)} to {signed_pct(m.high - 1)})"


def _where(c: dict) -> str:
    return (f"{c.get('model')} · {label(c)} · batch {c.get('batch')} · "
            f"{threads_label(c.get('threads'))} thr")


def _row(c: CellChange) -> list[str]:
    d = c.decode
    return [str(c.base.get("model")), label(c.base), str(c.base.get("batch")),
            threads_label(c.base.get("threads")),
            f"{num(d.base)} → {num(d.new)}" if d.ratio is not None else "—",
            change_text(d), change_text(c.metrics["ttft_ms"]), change_text(c.metrics["tpot_ms"]),
            change_text(c.metrics["peak_rss_mb"]),
            c.verdict + (f" ({c.note})" if c.note else "")]


COLUMNS = ("model", "backend · precision", "batch", "threads", "decode tok/s", "decode change",
           "TTFT change", "TPOT change", "peak memory change", "verdict")


def _md_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    out += ["| " + " | ".join(md_escape(x) for x in r) + " |" for r in rows]
    return out


def compare_markdown(result: Comparison) -> str:
    counts = {v: len(result.by_verdict(v)) for v in (FASTER, SLOWER, SAME, NOT_COMPARABLE)}
    lines = [f"# Comparison: {md_escape(result.base_run)} → {md_escape(result.new_run)}", "",
             f"{len(result.cells)} matched cells: **{counts[SLOWER]} slower**, **{counts[FASTER]} faster**, "
             f"{counts[SAME]} no significant change, {counts[NOT_COMPARABLE]} not comparable.", "",
             "Changes are new ÷ base − 1, with an interval from both runs' 95% intervals of the median "
             "(most pessimistic to most optimistic pairing). A verdict is faster or slower only when that "
             f"interval excludes zero and the decode rate moved by at least {result.noise_floor_pct:g}%; "
             f"peak memory has no spread and counts beyond {MEMORY_FLOOR_PCT:g}%.", ""]
    if not result.environments_match:
        lines += ["> **Warning: the environments differ**, so a change may come from the environment "
                  "rather than the code:", ">"]
        lines += [f"> - {md_escape(x)}" for x in result.fingerprint_diff] or ["> - (fingerprint ids differ)"]
        lines.append("")
    elif result.fingerprint_diff:
        lines += ["Same environment fingerprint; other differences: "
                  + "; ".join(md_escape(x) for x in result.fingerprint_diff) + ".", ""]
    significant = sorted((c for c in result.cells if c.verdict in (FASTER, SLOWER)),
                         key=lambda c: (c.decode.change, sort_key(c.base)))
    lines += ["## Significant changes", ""]
    lines += (_md_table([_row(c) for c in significant]) if significant
              else ["No cell changed its decode rate significantly."])
    lines.append("")
    broken = result.broken()
    if broken:
        lines += ["## Cells that ran in base and have no result in new", ""]
        lines += [f"- {md_escape(_where(c.base))}: {md_escape(c.note)}" for c in broken]
        lines.append("")
    for title, cells in (("Only in base", result.only_base), ("Only in new", result.only_new)):
        if cells:
            lines += [f"## {title}", ""] + [f"- {md_escape(_where(c))} ({md_escape(str(c.get('status')))})"
                                            for c in cells] + [""]
    lines += ["## All matched cells", "", "<details><summary>Show the table</summary>", ""]
    lines += _md_table([_row(c) for c in result.cells]) + ["", "</details>"]
    return "\n".join(lines) + "\n"


def compare_table(result: Comparison):
    """The comparison as a rich Table for the terminal: every matched cell, slowest change first."""
    from rich.markup import escape  # terminal only; the other renderers need nothing but the stdlib
    from rich.table import Table
    from rich.text import Text

    title = escape(f"{result.base_run} → {result.new_run}")
    if not result.environments_match:
        title += f"\n[yellow]environments differ: {escape('; '.join(result.fingerprint_diff))}[/yellow]"
    elif result.fingerprint_diff:
        other = escape("; ".join(result.fingerprint_diff))
        title += f"\n[dim]same environment; other differences: {other}[/dim]"
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(COLUMNS):
        t.add_column(col, justify="right" if 2 <= i <= 8 else "left", no_wrap=i < 9)
    style = {FASTER: "green", SLOWER: "bold red", SAME: "dim", NOT_COMPARABLE: "yellow"}
    order = sorted(result.cells, key=lambda c: (c.verdict != SLOWER, c.verdict != FASTER,
                                                c.decode.change if c.decode.change is not None else 0,
                                                sort_key(c.base)))
    for c in order:
        *cells, verdict = _row(c)
        t.add_row(*(Text(x) for x in cells), Text(verdict, style=style[c.verdict]))
    return t
