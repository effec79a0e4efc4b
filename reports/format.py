"""What a report's numbers say, apart from how they are drawn: formatting, reading cells, runs
grouped by machine, and the table types (the tables themselves: ``reports.tables``).

Both renderers (``markdown.py``, ``html.py``) walk the same ``Section`` list (``reports.sections``),
so the Markdown and the HTML report always show the same numbers. Everything is a pure function of the
run records; nothing here measures, imports torch or touches the store.

Runs that share a ``fingerprint_id`` (same machine, libraries and code) are merged into one
``Machine``; when two of them hold the same cell (the same ``cell_id``, which every stored
record carries), the later run's cell wins, as after ``--resume``. Cells from different
fingerprints are never put in one table.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

DASH = "—"

HOW_TO_READ = (
    "Decode rate is tokens/s summed over the batch, median over repetitions, with its 95% interval "
    "in brackets (from the interval of the median time per output token). Each table cell shows "
    "the fastest thread count (\"thr\"); the thread-scaling table shows them all. TTFT is the median "
    "time to first token (the prefill of the whole batch); memory is the peak resident memory of "
    "the cell's process; \"roof\" is the share of the decode rate the memory-bandwidth or compute "
    "bound allows; parity ✓/✗ is the check against eager fp32 with its top-1 token agreement "
    "(\"reference\" for eager fp32 itself, — where not checked). Each cell ran in several fresh "
    "processes (launches), one per round of the sweep, in a random order per round; its interval is "
    "a hierarchical bootstrap that resamples launches, then whole generations, so it spans the "
    "spread between processes and never treats the steps of one generation as independent. The "
    "best configuration is the fastest decode among cells whose parity check passed."
)


# --- numbers ---------------------------------------------------------------------------------

def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: float | None) -> str:
    """About three significant figures, thousands separated: 1,236 / 81.2 / 8.12 / 0.812."""
    if not _finite(x):
        return DASH
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return "0" if a == 0 else f"{x:.3g}"


def interval(value: float | None, low: float | None, high: float | None) -> str:
    """'812 (795–830)'; the value alone when the interval is unknown."""
    if not _finite(value):
        return DASH
    if not (_finite(low) and _finite(high)):
        return num(value)
    return f"{num(value)} ({num(low)}–{num(high)})"


def pct(fraction: float | None, digits: int = 0) -> str:
    return f"{100 * fraction:.{digits}f}%" if _finite(fraction) else DASH


def signed_pct(fraction: float | None) -> str:
    """A relative change: +4.2% / −12.3% (a real minus sign, so columns line up)."""
    if not _finite(fraction):
        return DASH
    return f"{100 * fraction:+.1f}%".replace("-", "−")


def ms(x: float | None) -> str:
    return f"{num(x)} ms" if _finite(x) else DASH


def mib(x: float | None) -> str:
    return f"{num(x)} MiB" if _finite(x) else DASH


def params(n: int | None) -> str:
    if not _finite(n):
        return "? parameters"
    return f"{n / 1e9:.2f} B parameters" if n >= 1e9 else f"{n / 1e6:.2f} M parameters"


# --- reading cells -----------------------------------------------------------------------------

def cell_id(cell: dict) -> str:
    """The cell's identity, as the harness stored it with the record."""
    try:
        return cell["cell_id"]
    except (KeyError, TypeError):
        raise ValueError(f"record {str(cell)[:80]!r} has no cell_id; is it a stored bench record?") from None


def flat_samples(cell: dict, kind: str) -> list[float]:
    """Every raw sample of one kind, however the record nests them (launches > generations > steps)."""
    out: list[float] = []

    def walk(x):
        if isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif _finite(x):
            out.append(float(x))

    walk((cell.get("samples") or {}).get(kind) or [])
    return out


def is_ok(cell: dict) -> bool:
    return cell.get("status") == "ok"


def is_serve(cell: dict) -> bool:
    """A load point against bench serve, not a generation: it has tables and charts of its own."""
    return cell.get("scenario") == "serve"


def serve_key(cell: dict) -> tuple:
    """Model, backend, precision, then the offered load (all at once last)."""
    rate = cell.get("rate")
    return (str(cell.get("model")), str(cell.get("backend")), str(variant(cell)), _none_last(cell.get("batch")),
            rate is None, rate or 0, _none_last(cell.get("max_concurrency")))


def load_text(cell: dict) -> str:
    """' · rate 8 req/s' for a serve cell (its offered load tells its rows apart); '' otherwise."""
    if not is_serve(cell):
        return ""
    rate = cell.get("rate")
    out = f" · rate {'inf' if rate is None else num(rate)} req/s"
    if cell.get("burstiness") not in (None, 1, 1.0):
        out += f" · burstiness {num(cell['burstiness'])}"
    if cell.get("max_concurrency"):
        out += f" · ≤{cell['max_concurrency']} in flight"
    return out


def is_peer(cell: dict) -> bool:
    """A peer's cell (hf, optimum-*): what a user would run instead; the harness stores the flag."""
    return bool(cell.get("peer") or (cell.get("backend_info") or {}).get("peer"))


PEER_MARK = " (peer)"


def variant(cell: dict) -> str:
    """The precision and, where a sweep had an options axis, the cell's backend options: what tells
    a backend's rows apart ("int8 · int8_scheme=per_channel")."""
    options = "".join(f" · {k}={v}" for k, v in sorted((cell.get("options") or {}).items()))
    return f"{cell.get('precision')}{options}"


def engine_precision(cell: dict) -> str | None:
    """A peer engine's own name for the scheme it ran (llama.cpp's "q4_0", CTranslate2's
    "int8_float32"), so two schemes are never shown under one precision without their names."""
    return (cell.get("backend_info") or {}).get("engine_precision")


def label(cell: dict) -> str:
    scheme = engine_precision(cell)
    return (f"{cell.get('backend')} · {variant(cell)}" + (f" ({scheme})" if scheme else "")
            + (PEER_MARK if is_peer(cell) else ""))


def threads_label(threads: int | None) -> str:
    return "default" if threads is None else str(threads)


def median(cell: dict, metric: str) -> float | None:
    stat = cell.get(metric)
    return stat.get("median") if isinstance(stat, dict) else None


def decode_interval(cell: dict) -> tuple[float | None, float | None]:
    """The 95% interval of decode tokens/s, as the harness derived and stored it (``decode_tok_s_ci``)."""
    ci = cell.get("decode_tok_s_ci")
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and _finite(ci[0]) and _finite(ci[1])):
        return None, None
    return ci[0], ci[1]


def decode_text(cell: dict) -> str:
    return interval(cell.get("decode_tok_s"), *decode_interval(cell))


def is_reference(cell: dict) -> bool:
    """Eager fp32: the reference every parity check compares against."""
    p = cell.get("parity")
    return isinstance(p, dict) and bool(p.get("reference"))


def parity_text(cell: dict) -> str:
    p = cell.get("parity")
    if not isinstance(p, dict):
        return DASH
    if p.get("reference"):
        return "reference"
    return f"{'✓' if p.get('passed') else '✗'} {pct(p.get('token_agreement'))}"


def parity_passed(cell: dict) -> bool:
    p = cell.get("parity")
    return isinstance(p, dict) and bool(p.get("passed"))


def quality_of(cell: dict) -> dict | None:
    """A cell's measured quality (trained checkpoints), or None."""
    q = cell.get("quality")
    return q if isinstance(q, dict) and isinstance(q.get("perplexity"), dict) else None


def quality_verdict(cell: dict) -> str | None:
    q = quality_of(cell)
    return None if q is None else (q.get("verdict") or {}).get("verdict")


def acceptable(cell: dict) -> bool:
    """Parity passed and the quality verdict, where measured, did not fail: a candidate for "best"."""
    return parity_passed(cell) and quality_verdict(cell) != "fail"


def _none_last(x):
    return (x is None, x if x is not None else 0)


def sort_key(cell: dict) -> tuple:
    """Deterministic order: model size, backend, precision, batch, threads, lengths."""
    return (_none_last(cell.get("n_params")), str(cell.get("model")), str(cell.get("backend")),
            str(variant(cell)), _none_last(cell.get("batch")), _none_last(cell.get("threads")),
            _none_last(cell.get("prompt_len")), _none_last(cell.get("gen_len")))


def models(cells: list[dict]) -> list[str]:
    """Model names, smallest first."""
    size = {c.get("model"): c.get("n_params") for c in cells if c.get("n_params") is not None}
    return sorted({c.get("model") for c in cells}, key=lambda m: (_none_last(size.get(m)), str(m)))


def rows(cells: list[dict]) -> list[tuple[str, str]]:
    return sorted({(str(c.get("backend")), str(variant(c))) for c in cells})


def best_by_threads(cells: list[dict]) -> dict[tuple, dict]:
    """(model, backend, precision, batch) -> the ok cell with the fastest decode over thread counts."""
    best: dict[tuple, dict] = {}
    for c in sorted(cells, key=sort_key):
        if not is_ok(c) or not _finite(c.get("decode_tok_s")):
            continue
        k = (c.get("model"), c.get("backend"), variant(c), c.get("batch"))
        if k not in best or c["decode_tok_s"] > best[k]["decode_tok_s"]:
            best[k] = c
    return best


def thread_counts(cells: list[dict]) -> list:
    return sorted({c.get("threads") for c in cells}, key=_none_last)


# --- runs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    """The runs of one fingerprint, their cells merged."""

    fingerprint_id: str
    fingerprint: dict
    runs: tuple[dict, ...]  # the run records without their cells, oldest first
    cells: tuple[dict, ...]  # inference cells, sorted by sort_key
    serve_cells: tuple[dict, ...] = ()  # load points against bench serve (scenario "serve")


def group_runs(runs: list[dict]) -> list[Machine]:
    """Merge runs by fingerprint; a later run's cell replaces an earlier one with the same key."""
    if not runs:
        raise ValueError("no runs to render: pass at least one run record")
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not isinstance(r.get("cells"), list):
            name = r.get("run_id", f"#{i}") if isinstance(r, dict) else f"#{i}"
            raise ValueError(f"run {name!r} has no 'cells' list; is it a run record?")
    by_fp: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: (str(r.get("created_at")), str(r.get("run_id")))):
        for part in split_by_machine(r):
            by_fp[str(part.get("fingerprint_id"))].append(part)
    machines = []
    for fp_id, group in by_fp.items():
        merged: dict[tuple, dict] = {}
        for r in group:
            for c in r["cells"]:
                merged[cell_id(c)] = c
        cells = sorted(merged.values(), key=sort_key)
        machines.append(Machine(fp_id, group[-1].get("fingerprint") or {},
                                tuple({k: v for k, v in r.items() if k != "cells"} for r in group),
                                tuple(c for c in cells if not is_serve(c)),
                                tuple(sorted((c for c in cells if is_serve(c)), key=serve_key))))
    return sorted(machines, key=lambda m: str(m.runs[0].get("created_at")))


def split_by_machine(run: dict) -> list[dict]:
    """The run as one part per machine its cells were measured on: a cell that carries its own
    ``fingerprint_id`` (measured on a node of a Ray cluster) belongs to that machine, whose
    fingerprint the run keeps under ``fingerprint["nodes"]``; any other cell, to the run's."""
    own = str(run.get("fingerprint_id"))
    nodes = (run.get("fingerprint") or {}).get("nodes") or {}
    cells: dict[str, list[dict]] = defaultdict(list)
    for c in run["cells"]:
        cells[str(c.get("fingerprint_id") or own)].append(c)
    if not cells:  # a run with no cells yet is still its own machine's
        cells[own] = []
    return [dict(run, fingerprint_id=fp_id, cells=part, rounds=_rounds_of(run, fp_id),
                 fingerprint=run.get("fingerprint") if fp_id == own else nodes.get(fp_id, {}))
            for fp_id, part in cells.items()]


def _rounds_of(run: dict, fp_id: str) -> list[dict]:
    """The run's rounds with the sentinel reading of one machine: a round on several Ray nodes
    keeps a reading per node (``sentinel["nodes"]``, each with its ``fingerprint_id``)."""
    out = []
    for rnd in run.get("rounds") or []:
        s = rnd.get("sentinel") or {}
        if "nodes" in s:
            mine = [r for r in s["nodes"].values() if isinstance(r, dict) and r.get("fingerprint_id") == fp_id]
            rnd = dict(rnd, sentinel=dict(mine[0], round=rnd.get("round")) if mine else None)
        out.append(rnd)
    return out


def environment(machine: Machine) -> list[tuple[str, str]]:
    """(field, value) lines describing where and with what the cells ran."""
    fp = machine.fingerprint
    cpu = fp.get("cpu") or {}
    isa = cpu.get("isa") or {}
    roof = fp.get("roofline") or {}
    peaks = roof.get("peak_gflops") or {}
    versions = fp.get("versions") or {}
    thread_env = {k: v for k, v in (fp.get("thread_env") or {}).items() if v is not None}
    gpus = fp.get("gpus") or []
    lengths = sorted({(c.get("prompt_len"), c.get("gen_len")) for c in machine.cells + machine.serve_cells
                      if c.get("scenario") != "train"}, key=str)  # training cells have a seq_len instead
    lines = [
        ("CPU", f"{cpu.get('brand', '?')} ({cpu.get('arch', '?')}), {cpu.get('cores_physical', '?')} "
                f"physical / {cpu.get('cores_logical', '?')} logical cores"),
        ("ISA", ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in isa.items()) or DASH),
        ("Memory", f"{num(fp.get('memory_gb'))} GB"),
        ("GPUs", ", ".join(str(g.get("name", g)) if isinstance(g, dict) else str(g) for g in gpus)
         or "none"),
        ("OS", str(fp.get("os", "?"))),
        ("Python", str(fp.get("python", "?"))),
        ("Libraries", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or DASH),
        ("Measured", f"memory bandwidth {num(roof.get('bandwidth_gb_s'))} GB/s; peak "
                     + (", ".join(f"{k} {num(v)}" for k, v in sorted(peaks.items())) or DASH)
                     + " GFLOP/s"),
        ("Thread environment", ", ".join(f"{k}={v}" for k, v in sorted(thread_env.items()))
         or "nothing set (library defaults)"),
        ("Lengths", "; ".join(f"{p} prompt + {g} generated tokens" for p, g in lengths) or DASH),
        ("Git commit", str(fp.get("git_commit") or "?")),
        ("Fingerprint", machine.fingerprint_id),
        ("Runs", ", ".join(f"{r.get('run_id')} ({r.get('created_at')})" for r in machine.runs)),
    ]
    return lines


# --- tables ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One table cell: lines of text (from the store, so renderers must escape them) and a sort key."""

    lines: tuple[str, ...]
    sort: float | str | None = None
    strong: bool = False  # the first line is the headline number
    tone: str = ""  # "", "good", "bad" or "muted": a hint for the HTML renderer


def text(s: str, sort=None, tone: str = "") -> Cell:
    return Cell((s,), s if sort is None else sort, tone=tone)


def number(x: float | None, shown: str | None = None, tone: str = "") -> Cell:
    return Cell((num(x) if shown is None else shown,), x if _finite(x) else None, tone=tone)


@dataclass(frozen=True)
class Table:
    id: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    numeric: tuple[bool, ...]  # right-align these columns
    caption: str = ""


@dataclass(frozen=True)
class Section:
    id: str  # also keys the HTML charts that belong here
    title: str
    text: str
    tables: tuple[Table, ...]
    collapsed: bool = False  # long detail: folded away in Markdown


def model_name(model) -> str:
    """A checkpoint directory by its last part; a preset by its name."""
    return str(model).rstrip("/").rsplit("/", 1)[-1]
