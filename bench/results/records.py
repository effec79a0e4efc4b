"""From launches to the cell record: merge the launches of a cell, then derive its metrics, once.

A cell runs in several launches (fresh processes, one per round of the sweep). Each launch
leaves a *launch record* in the store: its raw samples, grouped by generation, and what that
process saw (memory, load time, backend details). The *cell record* that reports and
``bench compare`` read is always derived from the stored launches by ``cell_record``:

- ``merge`` puts the launches' samples side by side (launches > generations > steps), keeps
  the cold facts of the first launch (load time, first call, parity, KV-cache size, backend
  details) and the largest memory reading of any launch;
- ``derive`` computes every statistic and rate from those samples: the median and the
  hierarchical bootstrap interval of each latency (``bench.results.stats.summarize_nested``), the
  token rates, and the roofline fraction against the cell's own device and thread count.

Nothing else computes these numbers, so a merged record, a resumed one and a fixture built
for the report tests all come out of the same arithmetic.
"""

from __future__ import annotations

import statistics

from bench.results import stats
from bench.spec import CellSpec

SAMPLE_KINDS = ("ttft_ms", "tpot_ms", "e2e_ms")
# Facts of the cell, not of the process: taken from the first launch that measured them.
COLD_FIELDS = ("n_params", "precision", "device", "build_s", "load_s", "first_call_ms", "weights_mb",
               "kv_cache_mb", "parity", "quality", "backend_info", "peak_after_load")
MAX_FIELDS = ("peak_rss_mb", "load_peak_rss_mb", "model_mb", "device_peak_mb")
# A training cell's launches (``bench.scenarios.train``): each trains from the same seed on the same
# tokens, so the losses are facts of the cell (the first launch's); memory, the largest of any launch.
TRAIN_SAMPLE_KINDS = ("step_ms",)
TRAIN_COLD_FIELDS = ("n_params", "trainable_params", "lora_rank", "precision", "device", "build_s", "load_s",
                     "weights_mb", "grads_mb",
                     "optimizer_mb", "loss_before", "loss_after", "losses", "data", "lr", "lr_warmup_steps", "optimizer",
                     "activation_method", "backend_info")
TRAIN_MAX_FIELDS = ("peak_rss_mb", "state_mb", "activation_mb", "step_transient_mb", "blocks_activation_mb", "device_peak_mb",
                    "device_activation_mb")


def merge(launches: list[dict], kinds: tuple[str, ...] = SAMPLE_KINDS, cold: tuple[str, ...] = COLD_FIELDS,
          peaks: tuple[str, ...] = MAX_FIELDS) -> dict:
    """One record of raw facts from the ok launch records of one cell, in launch order."""
    if not launches:
        raise ValueError("no launches to merge: a cell record needs at least one ok launch")
    bad = [r.get("status") for r in launches if r.get("status", "ok") != "ok"]
    if bad:
        raise ValueError(f"only ok launches merge; got status {bad[0]!r}")
    merged: dict = {}
    for name in cold:
        merged[name] = next((r[name] for r in launches if r.get(name) is not None), None)
    for name in peaks:
        values = [r[name] for r in launches if r.get(name) is not None]
        merged[name] = max(values) if values else None
    merged["samples"] = {k: [r["samples"][k] for r in launches] for k in kinds}
    merged["launches"] = len(launches)
    merged["launch_rounds"] = [r.get("round") for r in launches]
    merged["warmup_reps"] = sum(r.get("warmup_reps", 0) for r in launches)
    merged["warmup_settled"] = all(r.get("warmup_settled", False) for r in launches)
    compiles = [r.get("compiles") for r in launches]
    merged["compiles"] = compiles if any(c is not None for c in compiles) else None
    merged["recompiles_measured"] = (sum(c["measured"] for c in compiles if c is not None)
                                     if merged["compiles"] is not None else None)
    merged["wall_s"] = sum(r.get("wall_s", 0.0) for r in launches)
    return merged


def decode_rate(tpot: dict | None, batch: int | None) -> tuple[float | None, list[float] | None]:
    """Decode tokens/s of a batch and its 95% interval, from the time per output token's statistics.

    The one place this rate is derived: ``batch * 1000 / median TPOT``, its interval the TPOT
    interval read the other way round (the slow end of TPOT is the low end of the rate). Cell
    records store both (``decode_tok_s``, ``decode_tok_s_ci``); renderers only read them.
    """
    if not isinstance(tpot, dict) or not isinstance(batch, (int, float)):
        return None, None
    median, lo, hi = tpot.get("median"), tpot.get("ci95_low"), tpot.get("ci95_high")
    rate = batch / (median / 1e3) if _positive(median) else None
    ci = [batch * 1000 / hi, batch * 1000 / lo] if _positive(lo) and _positive(hi) else None
    return rate, ci


def _positive(v) -> bool:
    return stats.finite(v) and v > 0


def derive(record: dict, spec: CellSpec) -> dict:
    """The record with every statistic and rate computed from its samples (in place, and returned)."""
    samples = record["samples"]
    ttft = stats.per_generation(samples["ttft_ms"])
    e2e = stats.per_generation(samples["e2e_ms"])
    has_steps = spec.gen_len > 1 and all(g for launch in samples["tpot_ms"] for g in launch)
    record["ttft_ms"] = stats.summarize_nested(ttft)
    record["tpot_ms"] = stats.summarize_nested(samples["tpot_ms"]) if has_steps else None
    record["launch_medians"] = {
        "ttft_ms": [stats.nested_median(stats.per_generation([launch])) for launch in samples["ttft_ms"]],
        "tpot_ms": [stats.nested_median([launch]) for launch in samples["tpot_ms"]] if has_steps else None,
    }
    record["launch_sizes"] = {k: [len(launch) for launch in samples[k]] for k in SAMPLE_KINDS}
    record["unsteady"] = unsteady(record["launch_medians"]["tpot_ms"] or record["launch_medians"]["ttft_ms"],
                                  "per token" if has_steps else "to first token")
    note = recompiled(record.get("compiles"))
    if note:
        record["unsteady"] = f"{record['unsteady']}; {note}" if record["unsteady"] else note
    batch = spec.batch
    record["prefill_tok_s"] = batch * spec.prompt_len / (record["ttft_ms"]["median"] / 1e3)
    record["decode_tok_s"], record["decode_tok_s_ci"] = decode_rate(record["tpot_ms"] if has_steps else None, batch)
    record["e2e_tok_s"] = batch * spec.gen_len / (stats.nested_median(e2e) / 1e3)
    record.update(roofline_fields(record, spec))
    return record


def derive_train(record: dict, spec: CellSpec) -> dict:
    """A training cell's statistics from its step times (in place, and returned).

    ``step_ms`` is the median time of one optimizer step with its hierarchical interval
    (launches, then groups of consecutive steps); ``train_tok_s`` is the batch's tokens over
    it, its interval the step time's read the other way round.
    """
    step = stats.summarize_nested(record["samples"]["step_ms"])
    record["step_ms"] = step
    record["launch_medians"] = {"step_ms": [stats.nested_median([launch]) for launch in record["samples"]["step_ms"]]}
    record["launch_sizes"] = {"step_ms": [sum(len(g) for g in launch) for launch in record["samples"]["step_ms"]]}
    record["unsteady"] = unsteady(record["launch_medians"]["step_ms"], "per training step")
    tokens = spec.batch * spec.seq_len
    record["train_tok_s"] = tokens / (step["median"] / 1e3)
    groups = sum(len(launch) for launch in record["samples"]["step_ms"])
    # One group in all: its spread is unknown, and an interval of one point would claim none.
    record["train_tok_s_ci"] = [tokens / (step["ci95_high"] / 1e3), tokens / (step["ci95_low"] / 1e3)] \
        if groups > 1 else None
    return record


UNSTEADY_FACTOR = 1.5


def unsteady(medians: list[float], what: str, factor: float = UNSTEADY_FACTOR) -> str:
    """Why a cell's launches disagree by more than ``factor``, or "" when they agree.

    A launch whose median is ``factor`` times slower or faster than the cell's median launch
    landed differently (memory, cores, a neighbour's burst). It stays in the statistics -- it
    happened -- and the interval widens for it; this line says so, so a reader knows why the
    interval is wide and that more launches, or a quieter machine, would help.
    """
    if len(medians) < 2:
        return ""
    if len(medians) == 2:  # neither is "the median launch": say how far apart they are
        lo, hi = sorted(medians)
        if lo > 0 and hi / lo > factor:
            return f"its two launches differ {hi / lo:.1f}x ({medians[0]:.3g} and {medians[1]:.3g} ms {what})"
        return ""
    n = len(medians)
    ref = statistics.median(medians)  # the median launch
    notes = []
    for i, m in enumerate(medians):
        if ref > 0 and m > 0 and max(m / ref, ref / m) > factor:
            word = "slower" if m > ref else "faster"
            notes.append(f"launch {i + 1} of {n} ran {max(m / ref, ref / m):.1f}x {word} than the median launch "
                         f"({m:.3g} vs {ref:.3g} ms {what})")
    return "; ".join(notes)


def recompiled(compiles: list[dict | None] | None) -> str:
    """Which launches compiled a graph while they were measured, or "".

    A compiling backend (``compile``) compiles its shapes in load and warm-up; a graph compiled
    while measuring means a shape changed, and the steps that compiled it took seconds. They
    stay in the statistics, as they happened; this line says so, so a slow cell is not read
    as a slow backend.
    """
    if not compiles:
        return ""
    n = len(compiles)
    notes = [f"launch {i + 1} of {n} compiled {c['measured']} graph(s) while measured: "
             "its steps include compile time" for i, c in enumerate(compiles) if c and c["measured"] > 0]
    return "; ".join(notes)


def roofline_fields(record: dict, spec: CellSpec) -> dict:
    """The decode bound of the cell's own device and thread count, and the share of it achieved.

    A cell without a roofline for its device (a GPU nobody measured) gets none, never the CPU's.
    """
    out = dict(roofline_decode_tok_s=None, roofline_fraction=None, roofline_bound=None)
    if not spec.roofline or not record.get("decode_tok_s"):
        return out
    from bench.machine.roofline import decode_bound  # arithmetic only; measured by the parent at plan time
    from bench.models import model_config

    config = model_config(spec.model, spec.checkpoint)
    past = spec.prompt_len + spec.gen_len // 2  # the mean cache length over the decode steps
    bound = decode_bound(config, spec.batch, past, record.get("precision") or spec.precision, spec.roofline)
    out["roofline_decode_tok_s"] = bound["roofline_decode_tok_s"]
    out["roofline_bound"] = bound["bound"]
    out["roofline_fraction"] = record["decode_tok_s"] / bound["roofline_decode_tok_s"]
    return out


def identity_fields(spec: CellSpec) -> dict:
    """The record's leading fields: its identity, its id, how it was measured and whether its backend
    is a peer (``Backend.peer``), so reports can tell peers apart without importing ``backends/``."""
    from backends.registry import is_peer

    return dict(spec.identity(), cell_id=spec.id, planted_delay=spec.planted_delay, peer=is_peer(spec.backend))


def cell_record(spec: CellSpec, launches: list[dict], planned: int, n_params: int | None = None) -> dict:
    """The cell's record from all its stored launch records (any status), in launch order.

    ok when every launch so far was ok; otherwise the status and reason of the first launch
    that was not, its earlier ok launches still merged so nothing measured is lost.
    """
    ok = [r for r in launches if r.get("status") == "ok"]
    failed = next((r for r in launches if r.get("status") != "ok"), None)
    record = identity_fields(spec)
    record["n_params"] = n_params
    if ok and spec.scenario == "train":
        record.update(merge(ok, TRAIN_SAMPLE_KINDS, TRAIN_COLD_FIELDS, TRAIN_MAX_FIELDS))
        derive_train(record, spec)
    elif ok:
        record.update(merge(ok))
        derive(record, spec)
    record["launches_planned"] = planned
    if failed is None:
        record.update(status="ok", reason="")
    else:
        index = launches.index(failed) + 1
        record.update(status=failed["status"],
                      reason=f"launch {index} of {planned}: {failed.get('reason') or 'no reason recorded'}")
        if failed.get("traceback"):
            record["traceback"] = failed["traceback"]
    if record.get("n_params") is None:
        record["n_params"] = n_params
    record.update(spec.identity())  # what was planned, whatever a backend calls its device
    return record


def skipped_record(spec: CellSpec, reason: str, n_params: int | None) -> dict:
    return dict(identity_fields(spec), n_params=n_params, status="skipped", reason=reason, launches=0)
