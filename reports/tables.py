"""The report's tables, one function each: a machine's stored records in, a ``Table`` out.

Best configuration, the model tables, the peers, thread scaling, memory, quality, serving, drift,
the cells that did not pass and all cells. The numbers, record readers and table types they
are built from are ``reports.format``'s; ``reports.sections`` puts them in reading order.
"""

from __future__ import annotations

from collections import defaultdict

from reports.format import (DASH, PEER_MARK, Cell, Machine, Table, _finite, _none_last, acceptable, best_by_threads,
                            decode_text, engine_precision, is_ok, is_peer, label, median, mib, model_name, models, ms, num, number,
                            params, parity_passed, parity_text, pct, quality_of, quality_verdict, rows, sort_key,
                            text, thread_counts, threads_label, variant)


def model_table(machine: Machine, model: str) -> Table:
    """Backend x precision rows, batch columns: decode rate, TTFT, memory, roofline, parity."""
    cells = [c for c in machine.cells if c.get("model") == model]
    batches = sorted({c.get("batch") for c in cells}, key=_none_last)
    several_threads = len(thread_counts(machine.cells)) > 1
    best = best_by_threads(cells)
    peers = {c.get("backend") for c in cells if is_peer(c)}
    out = []
    for backend, precision in rows(cells):
        scheme = next((engine_precision(c) for c in cells if (c.get("backend"), variant(c)) == (backend, precision)
                       and engine_precision(c)), None)
        row = [text(f"{backend} · {precision}" + (f" ({scheme})" if scheme else "")
                    + (PEER_MARK if backend in peers else ""))]
        for b in batches:
            group = [c for c in cells if (c.get("backend"), variant(c), c.get("batch"))
                     == (backend, precision, b)]
            c = best.get((model, backend, precision, b))
            not_ok = [g for g in group if not is_ok(g)]
            if c is None:
                statuses = sorted({str(g.get("status")) for g in group}) or ["not run"]
                row.append(Cell((", ".join(statuses),), None, tone="muted"))
                continue
            thr = f" · {threads_label(c.get('threads'))} thr" if several_threads else ""
            lines = [decode_text(c),
                     f"TTFT {ms(median(c, 'ttft_ms'))} · {mib(c.get('peak_rss_mb'))}",
                     f"roof {pct(c.get('roofline_fraction'))} · {parity_text(c)}{thr}"]
            if c.get("unsteady"):
                lines.append("⚠ launches disagree (see drift)")
            if c.get("launches") == 1 and (c.get("launches_planned") or 1) == 1:
                lines.append("1 launch: one process's spread" + (" (screened out)" if str(
                    c.get("screen", "")).startswith("screened out") else ""))
            lines += [f"{threads_label(g.get('threads'))} thr: {g.get('status')}" for g in not_ok]
            tone = "bad" if isinstance(c.get("parity"), dict) and not parity_passed(c) else ""
            row.append(Cell(tuple(lines), c["decode_tok_s"], strong=True, tone=tone))
        out.append(tuple(row))
    return Table(f"model-{model_name(model)}", ("backend · precision", *(f"batch {b}" for b in batches)),
                 tuple(out), (False, *([True] * len(batches))),
                 caption=f"Decode tokens/s (95% interval), {model_name(model)}")


def _peer_candidate(c: dict) -> bool:
    """An ok cell with a decode rate whose parity, where checked, passed."""
    p = c.get("parity")
    return is_ok(c) and _finite(c.get("decode_tok_s")) and not (isinstance(p, dict) and not p.get("passed"))


def point(c: dict) -> tuple:
    """Where two cells compare: model, precision, batch, threads, and the prompt and generation
    lengths (decode after 512 cached tokens is not decode after 32)."""
    return c.get("model"), c.get("precision"), c.get("batch"), c.get("threads"), c.get("prompt_len"), c.get("gen_len")


def shape_note(cells: list[dict], c: dict) -> str:
    """" · prompt P + G" after a model's name where the run measured more than one shape; else nothing."""
    if len({(x.get("prompt_len"), x.get("gen_len")) for x in cells}) < 2:
        return ""
    return f" · prompt {c.get('prompt_len')} + {c.get('gen_len')}"


def peer_ratios(cells: list[dict]) -> list[dict]:
    """For each ok cell of our backends: the fastest peer cell at the same ``point`` (model, precision,
    batch, threads, lengths; ``None`` when there is none) and our decode rate over the peer's; and the
    same for the peer on our backend's own runtime (``backend_info.peer_of``: optimum-onnxruntime for
    onnxruntime)."""
    key = point
    best: dict[tuple, dict] = {}
    for c in sorted(cells, key=sort_key):
        if is_peer(c) and _peer_candidate(c) and (key(c) not in best
                                                 or c["decode_tok_s"] > best[key(c)]["decode_tok_s"]):
            best[key(c)] = c
    out = []
    for c in sorted(cells, key=sort_key):
        if is_peer(c) or not is_ok(c) or not _finite(c.get("decode_tok_s")):
            continue
        peer = best.get(key(c))
        twin = next((p for p in sorted(cells, key=sort_key) if is_peer(p) and _peer_candidate(p)
                     and key(p) == key(c) and (p.get("backend_info") or {}).get("peer_of") == c.get("backend")),
                    None)
        out.append(dict(cell=c, peer=peer, ratio=_rate_ratio(c, peer), twin=twin, twin_ratio=_rate_ratio(c, twin)))
    return out


def fastest_rows(cells: list[dict]) -> list[dict]:
    """Per ``point`` (model, precision, batch, threads, lengths) where a peer ran: the fastest peer and
    our fastest backend among cells whose parity, where checked, passed and whose quality did not
    fail, and ours over the peer (None where one side has no such cell)."""
    key = point
    best: dict[bool, dict[tuple, dict]] = {True: {}, False: {}}
    for c in sorted(cells, key=sort_key):
        if not _peer_candidate(c) or quality_verdict(c) == "fail":
            continue
        side = best[is_peer(c)]
        if key(c) not in side or c["decode_tok_s"] > side[key(c)]["decode_tok_s"]:
            side[key(c)] = c
    order = {m: i for i, m in enumerate(models(cells))}
    precisions = ("fp32", "bf16", "fp16", "int8", "int4")
    keys = sorted({key(c) for c in cells if is_peer(c)},
                  key=lambda k: (order.get(k[0], len(order)), precisions.index(k[1]) if k[1] in precisions else 9,
                                 _none_last(k[2]), _none_last(k[3]), _none_last(k[4]), _none_last(k[5])))
    return [dict(key=k, peer=best[True].get(k), ours=best[False].get(k),
                 ratio=_rate_ratio(best[False][k], best[True].get(k)) if k in best[False] else None) for k in keys]


def fastest_table(machine: Machine) -> Table | None:
    """The fastest peer per model, precision, batch and threads, and our best backend over it."""
    cells = list(machine.cells)
    rows_ = fastest_rows(cells)
    if not rows_:
        return None
    out = []
    for r in rows_:
        model, precision, batch, threads = r["key"][:4]
        peer, ours = r["peer"], r["ours"]
        side = [
            *((text(label(peer)), Cell((decode_text(peer),), peer["decode_tok_s"])) if peer else
              (Cell(("no peer passed",), None, tone="muted"), text(DASH))),
            *((text(label(ours)), Cell((decode_text(ours),), ours["decode_tok_s"], strong=True)) if ours else
              (Cell(("none of ours passed",), None, tone="muted"), text(DASH))),
        ]
        ratio = r["ratio"]
        out.append((text(model_name(model) + shape_note(cells, peer or ours)), text(str(precision)),
                    number(batch, str(batch)), text(threads_label(threads)), *side,
                    number(ratio, f"×{ratio:.2f}" if ratio is not None else DASH,
                           tone="" if ratio is None else "good" if ratio >= 1 else "bad")))
    return Table("fastest-peer", ("model", "precision", "batch", "threads", "fastest peer", "its decode tok/s",
                                  "our fastest", "its decode tok/s", "ours ÷ fastest peer"), tuple(out),
                 (False, False, True, True, False, True, False, True, True),
                 caption="Per model, precision, batch and threads: the fastest peer engine and the fastest of our "
                         "backends (parity passed, quality not failed), decode tokens/s with 95% intervals")


def _rate_ratio(c: dict, peer: dict | None) -> float | None:
    return c["decode_tok_s"] / peer["decode_tok_s"] if peer and peer["decode_tok_s"] > 0 else None


def _ratio_cells(peer: dict | None, ratio: float | None) -> list[Cell]:
    if peer is None:
        return [Cell(("no peer",), None, tone="muted"), text(DASH), text(DASH)]
    return [text(str(peer.get("backend"))), Cell((decode_text(peer),), peer["decode_tok_s"]),
            number(ratio, f"×{ratio:.2f}", tone="good" if ratio >= 1 else "bad")]


def peers_table(machine: Machine) -> Table | None:
    """Our backends against the best peer at the same model, precision, batch and threads; None without peers."""
    cells = list(machine.cells)
    if not any(is_peer(c) for c in cells):
        return None
    out = []
    for r in peer_ratios(cells):
        c = r["cell"]
        row = [text(model_name(c.get("model")) + shape_note(cells, c)), text(label(c)),
               number(c.get("batch"), str(c.get("batch"))), text(threads_label(c.get("threads"))),
               Cell((decode_text(c),), c["decode_tok_s"], strong=True)]
        row += _ratio_cells(r["peer"], r["ratio"]) + _ratio_cells(r["twin"], r["twin_ratio"])
        out.append(tuple(row))
    return Table("peers", ("model", "backend · precision", "batch", "threads", "decode tok/s", "best peer",
                           "peer decode tok/s", "ours ÷ best peer", "same-runtime peer", "its decode tok/s",
                           "ours ÷ it"), tuple(out),
                 (False, False, True, True, True, False, True, True, False, True, True),
                 caption="Decode tokens/s of each of our backends over the fastest peer, and over the peer on "
                         "the same runtime, at the same model, precision, batch and threads")


PEERS_TEXT = (
    "Peers are what a user would run instead of our adapters, on the same weights: the engines people pick "
    "for CPU inference (llama.cpp, CTranslate2, ONNX Runtime GenAI, OpenVINO GenAI), each through its own "
    "converter and generation API, and Hugging Face transformers (hf), optimum's ONNX Runtime model "
    "(optimum-onnxruntime) and optimum-intel's OpenVINO model (optimum-openvino). Their rows are marked (peer) "
    "everywhere, and an engine's own name for its scheme follows the precision (llama.cpp's q4_0 is int4, "
    "CTranslate2's int8_float32 is int8). The first table names the fastest peer at each model, precision, "
    "batch and thread count and rates our fastest backend against it. Below, each of our backends is rated against the "
    "fastest peer whose parity, where checked, passed, and against the peer on its own runtime (eager against "
    "hf, onnxruntime against optimum-onnxruntime, openvino against optimum-openvino), at the same model, "
    "precision, batch and thread count; \"no peer\" where none ran at that point."
)


def scaling_rows(cells: list[dict]) -> list[dict]:
    """Per model/backend/precision/batch: decode rate per thread count, and the speed-up of each
    thread count over the smallest one, with its efficiency (speed-up / thread ratio)."""
    numeric = [t for t in thread_counts(cells) if t is not None]
    out = []
    groups: dict[tuple, dict] = defaultdict(dict)
    for c in cells:
        if c.get("threads") is not None:
            groups[(c.get("model"), c.get("backend"), variant(c), c.get("batch"))][c["threads"]] = c
    order = {m: i for i, m in enumerate(models(cells))}
    for k in sorted(groups, key=lambda k: (order[k[0]], str(k[1]), str(k[2]), _none_last(k[3]))):
        by_t = groups[k]
        rates = {t: by_t[t].get("decode_tok_s") if t in by_t and is_ok(by_t[t]) else None
                 for t in numeric}
        base_t = numeric[0]
        base = rates[base_t]
        speedup = {t: rates[t] / base if _finite(base) and _finite(rates[t]) and base > 0 else None
                   for t in numeric[1:]}
        out.append(dict(model=k[0], backend=k[1], precision=k[2], batch=k[3], rates=rates,
                        speedup=speedup,
                        efficiency={t: s / (t / base_t) if s is not None else None
                                    for t, s in speedup.items()}))
    return out


def scaling_table(machine: Machine) -> Table | None:
    numeric = [t for t in thread_counts(machine.cells) if t is not None]
    if len(numeric) < 2 or numeric[0] <= 0:
        return None
    out = []
    for r in scaling_rows(list(machine.cells)):
        if not any(_finite(v) for v in r["rates"].values()):
            continue  # nothing ran: the cells are listed under "did not pass"
        row = [text(model_name(r["model"])), text(f"{r['backend']} · {r['precision']}"),
               number(r["batch"], str(r["batch"]))]
        row += [number(r["rates"][t]) for t in numeric]
        for t in numeric[1:]:
            s, e = r["speedup"][t], r["efficiency"][t]
            shown = f"×{s:.2f} · {pct(e)}" if s is not None else DASH
            row.append(Cell((shown,), s, tone="" if s is None or s >= 1 else "bad"))
        out.append(tuple(row))
    columns = ("model", "backend · precision", "batch",
               *(f"{t} thr tok/s" for t in numeric),
               *(f"speed-up {t} vs {numeric[0]} thr" for t in numeric[1:]))
    return Table("thread-scaling", columns, tuple(out), (False, False, True) + (True,) * (len(columns) - 3),
                 caption="Decode tokens/s per thread count; speed-up × and efficiency "
                         "(speed-up ÷ thread ratio)")


def best_table(machine: Machine) -> Table:
    best = best_by_threads(list(machine.cells))
    out = []
    for model in models(list(machine.cells)):
        batches = sorted({k[3] for k in best if k[0] == model}, key=_none_last)
        for b in batches:
            candidates = [c for k, c in best.items() if k[0] == model and k[3] == b]
            # a cell screened out after one launch is not recommended: the finalists' figures span three
            passed = [c for c in candidates if acceptable(c) and not str(c.get("screen", "")).startswith("screened out")]
            reference = best.get((model, "eager", "fp32", b))
            if not passed:
                out.append((text(model_name(model)), number(b, str(b)),
                            Cell(("no cell passed its parity and quality checks",), None, tone="muted"),
                            *(text(DASH) for _ in range(5))))
                continue
            c = max(passed, key=lambda c: (c["decode_tok_s"], label(c)))
            vs = c["decode_tok_s"] / reference["decode_tok_s"] if reference else None
            out.append((text(model_name(model)), number(b, str(b)), text(label(c), tone="good"),
                        text(threads_label(c.get("threads"))),
                        Cell((decode_text(c),), c["decode_tok_s"], strong=True),
                        number(vs, f"×{vs:.2f}" if vs is not None else DASH),
                        number(median(c, "ttft_ms"), ms(median(c, "ttft_ms"))),
                        number(c.get("peak_rss_mb"), mib(c.get("peak_rss_mb")))))
    return Table("best", ("model", "batch", "best backend · precision", "threads", "decode tok/s",
                          "vs eager fp32", "TTFT", "peak memory"), tuple(out),
                 (False, True, False, True, True, True, True, True),
                 caption="Fastest decode per model and batch among cells whose parity passed and whose "
                         "quality, where measured, did not fail")


def memory_table(machine: Machine) -> Table:
    """Peak memory against model size, at the smallest batch and its fastest thread count."""
    cells = list(machine.cells)
    names = models(cells)
    best = best_by_threads(cells)
    out = []
    for backend, precision in rows(cells):
        if not any(k[1:3] == (backend, precision) for k in best):
            continue  # nothing ran: listed under "did not pass"
        row = [text(f"{backend} · {precision}")]
        for m in names:
            batches = sorted({k[3] for k in best if k[:3] == (m, backend, precision)}, key=_none_last)
            c = best.get((m, backend, precision, batches[0])) if batches else None
            if c is None:
                row.append(Cell((DASH,), None, tone="muted"))
                continue
            row.append(Cell((mib(c.get("peak_rss_mb")), f"weights {mib(c.get('weights_mb'))}"),
                            c.get("peak_rss_mb"), strong=True))
        out.append(tuple(row))
    size = {c.get("model"): c.get("n_params") for c in cells}
    return Table("memory", ("backend · precision",
                            *(f"{model_name(m)} ({params(size.get(m))})" for m in names)),
                 tuple(out), (False, *([True] * len(names))),
                 caption="Peak resident memory of the cell process, smallest batch")


def _cells_summary(group: list[dict]) -> str:
    """'12: tiny, small × batch 1, 2, 4 × 1, 2 thr' for a full product, else each cell."""
    ms_ = models(group)
    bs = sorted({c.get("batch") for c in group}, key=_none_last)
    ts = thread_counts(group)
    if len(group) == len(ms_) * len(bs) * len(ts) and len(group) > 1:
        return (f"{len(group)}: {', '.join(map(str, ms_))} × batch {', '.join(map(str, bs))} "
                f"× {', '.join(threads_label(t) for t in ts)} thr")
    return ", ".join(f"{model_name(c.get('model'))} b{c.get('batch')} {threads_label(c.get('threads'))} thr"
                     for c in sorted(group, key=sort_key))


def problems_table(machine: Machine) -> Table | None:
    """Cells that are not ok, grouped by backend, precision, status and reason."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in machine.cells:
        if not is_ok(c):
            groups[(str(c.get("backend")), str(variant(c)), str(c.get("status")),
                    str(c.get("reason") or "no reason recorded"))].append(c)
    if not groups:
        return None
    out = [(text(f"{b} · {p}"), text(s, tone="muted" if s == "skipped" else "bad"),
            text(_cells_summary(g)), text(r)) for (b, p, s, r), g in sorted(groups.items())]
    return Table("not-ok", ("backend · precision", "status", "cells", "reason"), tuple(out),
                 (False, False, False, False), caption="Cells that did not run to the end")


def quality_failures_table(machine: Machine) -> Table | None:
    """Cells of a trained model whose quality verdict failed: as visible as a failed parity."""
    failed = [c for c in machine.cells if is_ok(c) and quality_verdict(c) == "fail"]
    if not failed:
        return None
    out = []
    for c in failed:
        d = quality_of(c).get("divergence") or {}
        out.append((text(model_name(c.get("model"))), text(label(c)), number(c.get("batch"), str(c.get("batch"))),
                    text(threads_label(c.get("threads"))),
                    number(d.get("ppl_ratio"), f"{d['ppl_ratio']:.4f}" if _finite(d.get("ppl_ratio")) else DASH,
                           tone="bad"),
                    number(d.get("kl_mean"), f"{d['kl_mean']:.2e}" if _finite(d.get("kl_mean")) else DASH),
                    number(d.get("same_top"), pct(d.get("same_top"), 2))))
    return Table("quality-failures", ("model", "backend · precision", "batch", "threads", "PPL ratio", "mean KL",
                                      "same top"), tuple(out), (False, False, True, True, True, True, True),
                 caption="Cells that ran but lost more quality than the verdict allows (1% perplexity, "
                         "0.01 top-1 accuracy)")


def parity_table(machine: Machine) -> Table | None:
    failed = [c for c in machine.cells if is_ok(c) and isinstance(c.get("parity"), dict)
              and not c["parity"].get("passed")]
    if not failed:
        return None
    out = []
    for c in failed:
        p, tol = c["parity"], c["parity"].get("tolerance") or {}
        limits = []
        if tol.get("max_abs_logit_diff") is not None:
            limits.append(f"|Δlogit| ≤ {num(tol['max_abs_logit_diff'])}")
        if tol.get("min_token_agreement") is not None:
            limits.append(f"agreement ≥ {pct(tol['min_token_agreement'])}")
        out.append((text(model_name(c.get("model"))), text(label(c)), number(c.get("batch"), str(c.get("batch"))),
                    text(threads_label(c.get("threads"))), number(p.get("max_abs_logit_diff")),
                    number(p.get("token_agreement"), pct(p.get("token_agreement"), 1), tone="bad"),
                    text(", ".join(limits) or DASH)))
    return Table("parity-failures", ("model", "backend · precision", "batch", "threads",
                                     "max |Δlogit|", "top-1 agreement", "tolerance"), tuple(out),
                 (False, False, True, True, True, True, False),
                 caption="Cells that ran but disagree with eager fp32 beyond the tolerance")


def all_cells_table(machine: Machine) -> Table:
    out = []
    for c in machine.cells:
        tpot = c.get("tpot_ms") if isinstance(c.get("tpot_ms"), dict) else {}
        ok = is_ok(c)
        out.append((text(model_name(c.get("model"))), text(str(c.get("backend")) + (PEER_MARK if is_peer(c) else "")),
                    text(str(variant(c))), number(c.get("batch"), str(c.get("batch"))),
                    text(threads_label(c.get("threads")), sort=c.get("threads")),
                    text(str(c.get("status")), tone="" if ok else "bad"),
                    Cell((decode_text(c),), c.get("decode_tok_s")),
                    number(median(c, "ttft_ms")), number(tpot.get("median")),
                    number(tpot.get("cv"), pct(tpot.get("cv"), 1)),
                    number(c.get("peak_rss_mb")), number(c.get("load_s")),
                    number(c.get("roofline_fraction"), pct(c.get("roofline_fraction"))),
                    text(parity_text(c), tone="bad" if isinstance(c.get("parity"), dict)
                         and not parity_passed(c) else "")))
    return Table("cells", ("model", "backend", "precision", "batch", "threads", "status", "decode tok/s",
                           "TTFT ms", "TPOT ms", "TPOT cv", "peak MiB", "load s", "roof", "parity"),
                 tuple(out), (False,) * 3 + (True,) * 2 + (False,) + (True,) * 7 + (False,),
                 caption="Every cell; medians, with the coefficient of variation of the time per token")


def quality_table(machine: Machine) -> Table | None:
    """Trained checkpoints: perplexity per backend and precision, and how far each moved from eager fp32."""
    best = best_by_threads(list(machine.cells))
    cells = [c for c in sorted(best.values(), key=sort_key) if quality_of(c)]
    if not cells:
        return None
    out = []
    for c in cells:
        q = quality_of(c)
        ppl, d = q["perplexity"], q.get("divergence")
        verdict = (q.get("verdict") or {}).get("verdict") or DASH
        tone = {"fail": "bad", "pass": "good", "inconclusive": "muted"}.get(verdict, "")
        row = [text(model_name(c.get("model"))), text(label(c)), number(c.get("batch"), str(c.get("batch"))),
               number(ppl.get("perplexity"), f"{num(ppl.get('perplexity'))} ± {num(ppl.get('perplexity_se'))}"),
               number(ppl.get("bits_per_byte"), f"{ppl['bits_per_byte']:.3f}" if _finite(ppl.get("bits_per_byte")) else DASH)]
        if d is None:
            row += [text("reference")] + [text(DASH) for _ in range(4)]
        else:
            row += [number(d["ppl_ratio"], f"{d['ppl_ratio']:.4f} ± {d['ppl_ratio_se']:.4f}"),
                    number(d["kl_mean"], f"{d['kl_mean']:.2e}"), number(d["kl_p99"], f"{d['kl_p99']:.2e}"),
                    number(d["same_top"], pct(d["same_top"], 2)), number(d["dp_rms"], pct(d["dp_rms"], 3))]
        row.append(text(verdict, tone=tone))
        row.append(number(c.get("decode_tok_s")))
        out.append(tuple(row))
    stream = (quality_of(cells[0]) or {}).get("stream") or {}
    return Table("quality", ("model", "backend · precision", "batch", "perplexity", "bits/byte", "PPL ratio",
                             "mean KL", "KL p99", "same top", "RMS Δp", "verdict", "decode tok/s"), tuple(out),
                 (False, False, True, True, True, True, True, True, True, True, False, True),
                 caption=f"Quality on {stream.get('n_ids', '?')} tokens of the {stream.get('source', '?')} "
                         f"{stream.get('split', '')} split (Python {stream.get('python', '?')}), "
                         f"against eager fp32 on the same windows")


def training_runs(machine: Machine) -> list[dict]:
    """The training runs of the checkpoints these runs benchmark (attached by ``bench report``)."""
    seen, out = set(), []
    for r in machine.runs:
        for t in r.get("training") or []:
            if t.get("run_id") not in seen:
                seen.add(t.get("run_id"))
                out.append(t)
    return out


def training_table(machine: Machine) -> Table | None:
    runs = training_runs(machine)
    if not runs:
        return None
    out = []
    for t in runs:
        summary = t.get("summary") or {}
        steps = t.get("steps") or []
        train = (t.get("config") or {}).get("train") or {}
        last = steps[-1] if steps else {}
        out.append((text(model_name(t.get("out_dir"))), text(str(t.get("run_id"))), text(str(t.get("status"))),
                    number(summary.get("step"), f"{summary.get('step', DASH)} / {train.get('steps', DASH)}"),
                    number(summary.get("tokens_seen"), f"{summary.get('tokens_seen', 0):,}"),
                    number(last.get("loss")), number(summary.get("best_val_loss"),
                                                     f"{summary['best_val_loss']:.4f} (step {summary.get('best_step')})"
                                                     if _finite(summary.get("best_val_loss")) else DASH),
                    number(summary.get("tokens_per_s"))))
    return Table("training", ("checkpoint", "training run", "status", "steps", "tokens seen", "final train loss",
                              "best validation loss", "tok/s"), tuple(out),
                 (False, False, False, True, True, True, True, True),
                 caption="How the benchmarked checkpoints were trained (bench train); losses in nats per token")


QUALITY_TEXT = (
    "For a model trained here, the quality of each backend and precision, measured the way llama.cpp's "
    "perplexity tool with --kl-divergence does: perplexity on the test split (each token scored once, "
    "fixed-length windows), and against eager fp32 on the same windows the PPL ratio, the mean and 99th "
    "percentile of the KL divergence of the next-token distributions, the share of tokens whose most likely "
    "next token is unchanged and the RMS change in the correct token's probability. The verdict is a pass "
    "when the 95% interval stays within a 1% relative perplexity rise (Intel Neural Compressor's default "
    "criterion) and a 0.01 drop in top-1 accuracy (NNCF's max_drop=0.01), a fail when it lies beyond, and "
    "inconclusive otherwise. Standard errors treat tokens as independent, as llama.cpp's do."
)


def sentinel_rows(machine: Machine) -> list[dict]:
    """Every drift-sentinel reading of the machine's runs: run, round, time and the readings."""
    out = []
    for r in machine.runs:
        for rnd in r.get("rounds") or []:
            s = rnd.get("sentinel") or {}
            if _finite(s.get("decode_ms")) or _finite(s.get("gemv_gb_s")):
                out.append(dict(run=str(r.get("run_id")), round=rnd.get("round"), at=str(s.get("at") or ""),
                                decode_ms=s.get("decode_ms"), gemv_gb_s=s.get("gemv_gb_s")))
    return out


def spread(values: list) -> float | None:
    """(largest - smallest) / median of the finite values: how far a series moved."""
    xs = sorted(v for v in values if _finite(v))
    if len(xs) < 2 or xs[len(xs) // 2] <= 0:
        return None
    return (xs[-1] - xs[0]) / xs[len(xs) // 2]


def unsteady_table(machine: Machine) -> Table | None:
    """Cells whose launches disagree: the reason their intervals are wide."""
    cells = [c for c in machine.cells if is_ok(c) and c.get("unsteady")]
    if not cells:
        return None
    out = tuple((text(model_name(c.get("model"))), text(label(c)), number(c.get("batch"), str(c.get("batch"))),
                 text(threads_label(c.get("threads"))), Cell((decode_text(c),), c.get("decode_tok_s")),
                 text(str(c["unsteady"]), tone="bad")) for c in cells)
    return Table("unsteady", ("model", "backend · precision", "batch", "threads", "decode tok/s", "launches"), out,
                 (False, False, True, True, True, False),
                 caption="Cells whose launches disagree by more than 1.5x: the outlier stays in the statistics "
                         "and widens the interval; more launches or a quieter machine narrow it")


def drift_table(machine: Machine) -> Table | None:
    rows_ = sentinel_rows(machine)
    if not rows_:
        return None
    out = tuple((text(r["run"]), number(r["round"], str(r["round"] + 1) if r["round"] is not None else DASH),
                 text(r["at"]), number(r["decode_ms"], f"{r['decode_ms']:.3f}" if _finite(r["decode_ms"]) else DASH),
                 number(r["gemv_gb_s"])) for r in rows_)
    return Table("drift", ("run", "round", "read at", "decode step ms", "gemv GB/s"), out,
                 (False, True, False, True, True),
                 caption="The drift sentinel, read at the start of every round, before the round's launches")


def drift_text(machine: Machine) -> str:
    rows_ = sentinel_rows(machine)
    if not rows_:
        return ("No drift-sentinel readings were stored with these runs (they predate it), so how much "
                "the machine drifted during them is unknown.")
    d, g = spread([r["decode_ms"] for r in rows_]), spread([r["gemv_gb_s"] for r in rows_])
    moved = ", ".join(f"{name} moved {pct(v, 1)} (largest − smallest, over the median)"
                      for name, v in (("the sentinel's decode step", d), ("its gemv bandwidth", g)) if v is not None)
    return ("A fixed small workload (a decode step of the small preset, and a memory-bound gemv) is read "
            "at the start of every round. Rounds visit the cells in a fresh random order, so drift lands on "
            "every cell alike rather than on a few; each launch records its round's reading. "
            + (f"Over these runs {moved}." if moved else "Only one reading was taken."))


SERVE_TEXT = (
    "bench load against bench serve: requests arrive at the offered rate (gamma gaps, \"inf\": all at once) "
    "and stream their tokens. TTFT is arrival to first token; TPOT is (latency − TTFT) / (tokens − 1) per "
    "request; ITL is every gap between streamed tokens; all are percentiles over the requests. Throughput "
    "counts successful requests and their tokens from the first send to the last completion; goodput counts "
    "only the requests that met every SLO. Batching is continuous when new requests join the running batch "
    "between decode steps, static when a batch must finish before the next starts.")


def _pair(c: dict, key: str) -> str:
    p = c.get(key) or {}
    return f"{num(p.get('median'))} / {num(p.get('p99'))}" if p else DASH


def serve_table(machine: Machine) -> Table:
    """One row per load point: the offered load, what was served, and the latencies."""
    rows = []
    for c in machine.serve_cells:
        rate = c.get("rate")
        errors = ", ".join(f"{n} {k}" for k, n in (c.get("errors") or {}).items())
        if not is_ok(c):
            errors = f"{c.get('status')}: {c.get('reason') or 'no reason recorded'}"
        ok = c.get("n_ok") or 0
        rows.append((text(model_name(c.get("model"))), text(label(c)), text(str(c.get("batching") or DASH)),
                     number(c.get("batch"), str(c.get("batch"))),
                     number(rate, "inf" if rate is None else num(rate)),
                     number(ok, f"{ok} / {c.get('num_requests')}", tone="bad" if errors else ""),
                     text(errors or DASH, tone="bad" if errors else "muted"),
                     number(c.get("request_throughput")), number(c.get("output_tok_s")),
                     number(c.get("goodput")) if c.get("slo_ms") else text(DASH, tone="muted"),
                     text(_pair(c, "ttft_pct")), text(_pair(c, "tpot_pct")), text(_pair(c, "itl_pct"))))
    return Table("serving", ("model", "backend · precision", "batching", "max batch", "rate req/s", "ok",
                             "errors", "req/s", "output tok/s", "goodput req/s", "TTFT ms p50 / p99",
                             "TPOT ms p50 / p99", "ITL ms p50 / p99"),
                 tuple(rows), (False, False, False, True, True, True, False, True, True, True, True, True, True),
                 caption="Load points against bench serve")
