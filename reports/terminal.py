"""Rich tables and lines for the terminal: records in, ``rich`` renderables and strings out.

The ``bench`` command prints these; like the other renderers they take stored records (or the
plain dicts a command returns) and never run a model. Decode rates and their intervals are
read from the record (``decode_tok_s``, ``decode_tok_s_ci``), never derived here.
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from reports.format import decode_interval


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def rate_text(rate) -> str:
    """An offered request rate: inf for all at once."""
    return "inf" if rate is None else f"{rate:g}"


def _options_text(options: dict | None) -> str:
    return "".join(f" {k}={v}" for k, v in sorted((options or {}).items()))


def _launches(n: int) -> str:
    return f"{n} launch{'es' if n > 1 else ''}"


# -- bench info ----------------------------------------------------------------------------------


def info_tables(fp: dict, torch_build: dict, roofline: dict | None, probes: dict) -> list[Table]:
    """The machine, its libraries and every backend's availability (``probes``: name -> Probe.to_dict())."""
    cpu = fp["cpu"]
    machine = Table(title="Machine", show_header=False, title_justify="left")
    machine.add_row("CPU", f"{cpu['brand']} ({cpu['arch']})")
    machine.add_row("Cores", f"{cpu['cores_physical']} physical, {cpu['cores_logical']} logical")
    machine.add_row("ISA", "  ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["isa"].items()))
    machine.add_row("Memory", f"{fp['memory_gb']:.1f} GB")
    machine.add_row("OS", f"{fp['os']}, Python {fp['python']}")
    gpus = fp.get("gpus") or []
    machine.add_row("GPUs", ", ".join(g["name"] for g in gpus) if gpus else "none found")
    if roofline:
        peaks = ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in roofline["peak_gflops"].items())
        machine.add_row("Measured", f"memory bandwidth {roofline['bandwidth_gb_s']:.1f} GB/s; matmul {peaks} "
                                    f"({roofline['threads']} threads)")
    machine.add_row("torch build", ", ".join(f"{k} {v}" for k, v in torch_build.items()))
    versions = Table(title="Libraries", title_justify="left")
    versions.add_column("library")
    versions.add_column("version")
    for name, version in fp["versions"].items():
        versions.add_row(name, version or "not installed")
    backends = Table(title="Backends", title_justify="left")
    for col in ("backend", "status", "devices", "reason / fix"):
        backends.add_column(col)
    for name, p in probes.items():
        status = "[green]available[/]" if p["available"] else "[red]unavailable[/]"
        why = p["reason"] + (f" — fix: {p['fix']}" if p.get("fix") else "")
        backends.add_row(name, status, ", ".join(p["devices"]), why)
    return [machine, versions, backends]


# -- bench run -----------------------------------------------------------------------------------


def launch_line(label: str, status: str, record: dict) -> str:
    """One finished launch, as the sweep's progress prints it (rich markup)."""
    if status == "ok" and record["status"] == "ok" and record.get("scenario") == "train":
        low, high = record.get("train_tok_s_ci") or (None, None)
        ci = f" ({fmt(low)}–{fmt(high)})" if low else ""
        return (f"[green]ok[/]      {escape(label)}: {fmt(record.get('train_tok_s'))}{ci} training tok/s "
                f"after {_launches(record['launches'])}")
    if status == "ok" and record["status"] == "ok":
        low, high = decode_interval(record)
        ci = f" ({fmt(low)}–{fmt(high)})" if low is not None else ""
        line = (f"[green]ok[/]      {escape(label)}: {fmt(record.get('decode_tok_s'))}{ci} tok/s decode "
                f"after {_launches(record['launches'])}")
        if record.get("unsteady"):
            line += f" [yellow](unsteady: {escape(record['unsteady'])})[/]"
        return line
    return f"[yellow]{status:<8}[/]{escape(label)}: {escape(str(record.get('reason', '')))}"


def summary_table(cells: list[dict]) -> Table:
    table = Table(title="Results", title_justify="left")
    for col, justify in (("model", "left"), ("backend", "left"), ("prec", "left"), ("batch", "right"),
                         ("threads", "right"), ("status", "left"), ("decode tok/s", "right"),
                         ("95% CI", "right"), ("TPOT ms p50/p90", "right"), ("TTFT ms p50", "right"),
                         ("peak RSS MB", "right"), ("roofline", "right"), ("parity", "left")):
        table.add_column(col, justify=justify)
    for c in cells:
        tpot = c.get("tpot_ms") or {}
        ttft = c.get("ttft_ms") or {}
        low, high = decode_interval(c)
        ci = f"{low:,.1f}–{high:,.1f}" if low is not None else "-"
        parity = c.get("parity")
        p = "-"
        if parity and parity.get("reference"):
            p = "reference"
        elif parity:
            mark = "[green]✓[/]" if parity["passed"] else "[red]✗[/]"
            diff = parity.get("max_abs_logit_diff")  # None: an engine without logits, judged on its tokens
            p = f"{mark} {parity['token_agreement']:.0%} " + (f"Δ{diff:.1e}" if diff is not None else "tokens")
        status = c["status"] if c["status"] == "ok" else f"[yellow]{c['status']}[/]"
        tpot_txt = f"{fmt(tpot.get('median'), 2)}/{fmt(tpot.get('p90'), 2)}" if tpot else "-"
        frac = c.get("roofline_fraction")
        table.add_row(Path(c["model"]).name, c["backend"], (c["precision"] or "-") + _options_text(c.get("options")),
                      str(c["batch"]), str(c["threads"] or "default"), status, fmt(c.get("decode_tok_s")), ci, tpot_txt,
                      fmt(ttft.get("median"), 2), fmt(c.get("peak_rss_mb"), 0),
                      "-" if frac is None else f"{frac:.0%}", p)
    return table


def train_summary_table(cells: list[dict]) -> Table:
    table = Table(title="Training results", title_justify="left")
    for col, justify in (("model", "left"), ("backend", "left"), ("prec", "left"), ("batch", "right"),
                         ("seq", "right"), ("ckpt", "left"), ("threads", "right"), ("status", "left"),
                         ("train tok/s", "right"), ("95% CI", "right"), ("step ms p50", "right"),
                         ("activations MB", "right"), ("peak RSS MB", "right"), ("loss before → after", "left")):
        table.add_column(col, justify=justify)
    for c in cells:
        step = c.get("step_ms") or {}
        low, high = c.get("train_tok_s_ci") or (None, None)
        loss = (f"{c['loss_before']:.4f} → {c['loss_after']:.4f}"
                if c.get("loss_before") is not None and c.get("loss_after") is not None else "-")
        status = c["status"] if c["status"] == "ok" else f"[yellow]{c['status']}[/]: {c.get('reason', '')}"
        table.add_row(Path(c["model"]).name, c["backend"], c["precision"] or "-", str(c["batch"]),
                      str(c.get("seq_len")), "on" if c.get("grad_checkpointing") else "off",
                      str(c["threads"] or "default"), status, fmt(c.get("train_tok_s")),
                      f"{fmt(low)}–{fmt(high)}" if low else "-", fmt(step.get("median"), 1),
                      fmt(c.get("activation_mb"), 0), fmt(c.get("peak_rss_mb"), 0), loss)
    return table


# -- stored runs ---------------------------------------------------------------------------------


def runs_table(runs: list[dict], store: str) -> Table:
    table = Table(title=f"Runs in {store}", title_justify="left")
    for col in ("run", "created", "name", "cells", "ok", "fingerprint", "status"):
        table.add_column(col)
    for r in runs:
        table.add_row(r["run_id"], r["created_at"][:19], r.get("name") or "", str(r["n_cells"]), str(r["n_ok"]),
                      r["fingerprint_id"], r.get("status") or "")
    return table


# -- serving -------------------------------------------------------------------------------------


def serve_line(record: dict) -> str:
    """One load point of ``bench run --scenario serve`` as it lands (plain text)."""
    where = f"{record['backend']}/{record['precision']} rate {rate_text(record['rate'])}"
    if record["status"] == "ok":
        return (f"ok      {where}: {record['n_ok']} ok, {record['n_errors']} errors, "
                f"{fmt(record['output_tok_s'])} tok/s")
    return f"{record['status']:<8}{where}: {record['reason']}"


def load_line(record: dict) -> str:
    """One load point of ``bench load`` as it lands (plain text)."""
    return (f"rate {rate_text(record['rate'])}: {record['n_ok']} ok, {record['n_errors']} errors, "
            f"{fmt(record['output_tok_s'])} tok/s")


def load_table(cells: list[dict], run_id: str) -> Table:
    first = cells[0]
    shape = (first.get("server") or {}).get("model_shape")  # family and shape, from the server's /health
    model = f"{first['model']} ({shape})" if shape else first["model"]
    table = Table(title=f"Load run {run_id}: {model} on {first['backend']}/{first['precision']}, "
                        f"max batch {first['batch']}, {first.get('batching')} batching", title_justify="left")
    for col in ("rate req/s", "ok", "errors", "req/s", "out tok/s", "goodput req/s", "TTFT ms p50/p99",
                "TPOT ms p50/p99", "ITL ms p50/p99", "latency ms p50/p99"):
        table.add_column(col, justify="left" if col == "errors" else "right")
    for c in cells:
        def pp(key):
            p = c.get(key) or {}
            return f"{fmt(p.get('median'), 2)}/{fmt(p.get('p99'), 2)}" if p else "-"
        errors = ", ".join(f"{n} {k}" for k, n in c["errors"].items()) or "-"
        table.add_row(rate_text(c["rate"]), str(c["n_ok"]), errors, fmt(c["request_throughput"], 2),
                      fmt(c["output_tok_s"]), fmt(c["goodput"], 2) if c["slo_ms"] else "-",
                      pp("ttft_pct"), pp("tpot_pct"), pp("itl_pct"), pp("e2e_pct"))
    return table


# -- quality -------------------------------------------------------------------------------------


def quality_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['backend']}/{row['precision']}: {row['status']}: {row['reason']}"
    q = row["quality"]
    return f"{row['backend']}/{row['precision']}: perplexity {q['perplexity']['perplexity']:.3f} ({q['verdict']['verdict']})"


def _quality_label(row: dict) -> str:
    opts = row.get("backend_info") or {}
    return row["precision"] + "".join(f" {k}={v}" for k, v in opts.items() if k != "quantized_checkpoint")


def quality_table(results: list[dict], stream: dict) -> Table:
    table = Table(title=f"Quality on {stream['n_ids']:,} tokens of {stream['source']} ({stream['split']})",
                  title_justify="left")
    for col in ("backend", "prec", "perplexity", "bits/byte", "PPL ratio", "mean KL", "KL p99", "same top",
                "RMS Δp", "verdict"):
        table.add_column(col, justify="left" if col in ("backend", "prec", "verdict") else "right")
    for r in results:
        if r["status"] != "ok":
            table.add_row(r["backend"], r["precision"], *["-"] * 7, f"[yellow]{r['status']}[/]: {r['reason']}")
            continue
        q = r["quality"]
        ppl = q["perplexity"]
        d = q.get("divergence")
        verdict = q["verdict"]["verdict"]
        colour = {"pass": "green", "fail": "red", "inconclusive": "yellow"}.get(verdict, "dim")
        if d is None:
            cells = ["reference"] + ["-"] * 4
        else:
            cells = [f"{d['ppl_ratio']:.4f} ± {d['ppl_ratio_se']:.4f}", f"{d['kl_mean']:.2e}", f"{d['kl_p99']:.2e}",
                     f"{100 * d['same_top']:.2f}%", f"{100 * d['dp_rms']:.3f}%"]
        table.add_row(r["backend"], _quality_label(r), f"{ppl['perplexity']:.3f} ± {ppl['perplexity_se']:.3f}",
                      fmt(ppl.get("bits_per_byte"), 3), *cells, f"[{colour}]{verdict}[/]")
    return table
