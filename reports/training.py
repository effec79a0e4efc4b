"""What a report says about training cells (``bench run --scenario train``): its sections and charts.

Pure functions of stored records, like ``reports.format``, whose ``sections`` appends these
when a machine's cells include training cells; inference-only reports are unchanged. Three
questions, each a section:

- how fast does it train: training tokens/s (forward + backward + AdamW step) with the
  interval of the step time, against batch and sequence length;
- what does gradient checkpointing save and cost: the same cell with it off and on, side by
  side, its activation memory and peak resident memory against its step time;
- how does training compare with inference on the same model and hardware: training tokens/s
  beside the prefill and decode rates of the inference cell of the same model, backend,
  precision, threads and batch (from the same run or another run of the same fingerprint).
"""

from __future__ import annotations

from collections import defaultdict

from reports import charts
from reports.charts import Series
from reports.format import (DASH, Cell, Machine, Section, Table, _finite, _none_last, interval, is_ok, label, mib,
                            model_name, models, num, number, text, threads_label)
from reports.tables import problems_table


def is_train(cell: dict) -> bool:
    return cell.get("scenario") == "train"


def ckpt(cell: dict) -> str:
    return "on" if cell.get("grad_checkpointing") else "off"


def train_text(cell: dict) -> str:
    low, high = cell.get("train_tok_s_ci") or (None, None)
    return interval(cell.get("train_tok_s"), low, high)


def step_median(cell: dict) -> float | None:
    s = cell.get("step_ms")
    return s.get("median") if isinstance(s, dict) else None


def loss_text(cell: dict) -> str:
    a, b = cell.get("loss_before"), cell.get("loss_after")
    return f"loss {a:.3f} → {b:.3f}" if _finite(a) and _finite(b) else "loss —"


def _key(cell: dict) -> tuple:
    return (str(cell.get("model")), str(cell.get("backend")), str(cell.get("precision")),
            _none_last(cell.get("threads")), _none_last(cell.get("batch")), _none_last(cell.get("seq_len")),
            bool(cell.get("grad_checkpointing")))


def throughput_table(cells: list[dict], model: str) -> Table:
    """Rows: backend · precision · checkpointing (and threads); columns: batch × sequence length."""
    mine = [c for c in cells if c.get("model") == model]
    shapes = sorted({(c.get("batch"), c.get("seq_len")) for c in mine}, key=lambda s: (_none_last(s[0]), _none_last(s[1])))
    several_threads = len({c.get("threads") for c in mine}) > 1
    rows = sorted({(str(c.get("backend")), str(c.get("precision")), ckpt(c), c.get("threads")) for c in mine},
                  key=lambda r: (r[0], r[1], r[2], _none_last(r[3])))
    out = []
    for backend, precision, gc, threads in rows:
        head = f"{backend} · {precision} · ckpt {gc}" + (f" · {threads_label(threads)} thr" if several_threads else "")
        row = [text(head)]
        for b, t in shapes:
            c = next((c for c in mine if (str(c.get("backend")), str(c.get("precision")), ckpt(c), c.get("threads"),
                                          c.get("batch"), c.get("seq_len")) == (backend, precision, gc, threads, b, t)),
                     None)
            if c is None:
                row.append(Cell((DASH,), None, tone="muted"))
            elif not is_ok(c):
                row.append(Cell((str(c.get("status")),), None, tone="muted"))
            else:
                row.append(Cell((train_text(c), f"step {num(step_median(c))} ms · {mib(c.get('peak_rss_mb'))}",
                                 loss_text(c)), c.get("train_tok_s"), strong=True))
        out.append(tuple(row))
    return Table(f"train-{model_name(model)}", ("backend · precision · checkpointing",
                                                *(f"batch {b} × {t}" for b, t in shapes)),
                 tuple(out), (False, *([True] * len(shapes))),
                 caption=f"Training tokens/s (95% interval), {model_name(model)}: forward, backward and AdamW step")


def _ratio(on, off) -> float | None:
    return on / off if _finite(on) and _finite(off) and off > 0 else None


def checkpointing_pairs(cells: list[dict]) -> list[tuple[dict, dict]]:
    """(off, on) for every ok cell measured with gradient checkpointing both off and on."""
    by: dict[tuple, dict] = {}
    for c in cells:
        if is_ok(c):
            by[_key(c)] = c
    pairs = []
    for k, off in sorted(by.items()):
        if not k[-1] and (*k[:-1], True) in by:
            pairs.append((off, by[(*k[:-1], True)]))
    return pairs


def checkpointing_table(cells: list[dict]) -> Table | None:
    pairs = checkpointing_pairs(cells)
    if not pairs:
        return None
    out = []
    for off, on in pairs:
        act = _ratio(on.get("activation_mb"), off.get("activation_mb"))
        blocks = _ratio(on.get("blocks_activation_mb"), off.get("blocks_activation_mb"))
        rss = _ratio(on.get("peak_rss_mb"), off.get("peak_rss_mb"))
        step = _ratio(step_median(on), step_median(off))
        out.append((text(model_name(off.get("model"))), text(label(off)),
                    number(off.get("batch"), str(off.get("batch"))), number(off.get("seq_len"), str(off.get("seq_len"))),
                    text(threads_label(off.get("threads"))),
                    number(off.get("activation_mb"), mib(off.get("activation_mb"))),
                    number(on.get("activation_mb"), mib(on.get("activation_mb"))),
                    number(act, f"×{act:.2f}" if act is not None else DASH, tone="good" if act is not None and act <= 0.5 else ""),
                    number(blocks, f"×{blocks:.2f}" if blocks is not None else DASH),
                    number(rss, f"×{rss:.2f}" if rss is not None else DASH),
                    number(step_median(off)), number(step_median(on)),
                    number(step, f"×{step:.2f}" if step is not None else DASH)))
    return Table("grad-checkpointing", ("model", "backend · precision", "batch", "seq len", "threads",
                                        "activations off", "activations on", "activations on/off",
                                        "blocks' activations on/off", "peak RSS on/off", "step ms off",
                                        "step ms on", "step time on/off"),
                 tuple(out), (False, False, True, True, True) + (True,) * 8,
                 caption="Gradient checkpointing off and on for the same cell: memory saved and time paid. "
                         "Activations: the step's resident peak above the weights, gradients and AdamW state, "
                         "the logits and loss included; blocks' activations: what the transformer blocks hold "
                         "for the backward pass when the forward pass reaches the LM head")


def inference_match(train: dict, inference: list[dict]) -> dict | None:
    """The ok inference cell of the same model, backend, precision, device and threads, the same
    batch where there is one, else the fastest prefill."""
    same = [c for c in inference if is_ok(c) and all(c.get(f) == train.get(f) for f in
                                                    ("model", "backend", "precision", "device", "threads"))
            and _finite(c.get("prefill_tok_s"))]
    if not same:
        return None
    exact = [c for c in same if c.get("batch") == train.get("batch")]
    return max(exact or same, key=lambda c: (c["prefill_tok_s"], str(c.get("batch"))))


def versus_table(cells: list[dict], inference: list[dict]) -> Table | None:
    out = []
    for c in cells:
        if not is_ok(c) or c.get("grad_checkpointing"):
            continue
        inf = inference_match(c, inference)
        if inf is None:
            continue
        ratio = _ratio(c.get("train_tok_s"), inf.get("prefill_tok_s"))
        out.append((text(model_name(c.get("model"))), text(label(c)), text(threads_label(c.get("threads"))),
                    text(f"{c.get('batch')} × {c.get('seq_len')}"), Cell((train_text(c),), c.get("train_tok_s"), strong=True),
                    text(f"{inf.get('batch')} × {inf.get('prompt_len')}"), number(inf.get("prefill_tok_s")),
                    number(inf.get("decode_tok_s")),
                    number(ratio, f"×{ratio:.2f}" if ratio is not None else DASH)))
    if not out:
        return None
    return Table("train-vs-inference", ("model", "backend · precision", "threads", "training batch × seq",
                                        "training tok/s", "inference batch × prompt", "prefill tok/s",
                                        "decode tok/s", "training / prefill"), tuple(out),
                 (False, False, True, False, True, False, True, True, True),
                 caption="Training tokens/s beside inference on the same model, backend, precision and threads "
                         "(checkpointing off); a training step is a forward pass over every token, its backward "
                         "pass (about twice the work) and an optimizer step")


THROUGHPUT_TEXT = (
    "Training tokens/s is the batch's tokens (batch × sequence length) over the median time of one optimizer "
    "step (forward, backward, gradient clipping and AdamW, bench train's step), with its 95% interval; each "
    "cell ran in fresh processes, its interval a hierarchical bootstrap over launches and groups of "
    "consecutive steps. bf16 and fp16 are autocast (fp32 weights and optimizer state; fp16 with a gradient "
    "scaler). The batches are seeded random tokens, so the loss starts near ln(vocabulary); the loss of one "
    "fixed batch before and after the timed steps shows a precision whose updates do not train (a non-finite "
    "loss fails the cell)."
)


def training_sections(machine: Machine, inference: list[dict]) -> list[Section]:
    cells = [c for c in machine.cells if is_train(c)]
    out = []
    for m in models(cells):
        out.append(Section(f"train-{model_name(m)}", f"Training {model_name(m)}", THROUGHPUT_TEXT,
                           (throughput_table(cells, m),)))
    ck = checkpointing_table(cells)
    if ck is not None:
        out.append(Section("grad-checkpointing", "Gradient checkpointing: memory saved, time paid",
                           "Each block's activations are recomputed in the backward pass instead of kept: "
                           "ratios below 1 are memory saved, the step-time ratio above 1 the time paid.", (ck,)))
    vs = versus_table(cells, inference)
    if vs is not None:
        out.append(Section("train-vs-inference", "Training against inference", "", (vs,)))
    problems = problems_table(Machine(machine.fingerprint_id, machine.fingerprint, machine.runs,
                                      tuple(c for c in cells if not is_ok(c))))
    if problems is not None:
        out.append(Section("train-did-not-pass", "Training cells that did not run",
                           "Skipped, failed, timed-out and out-of-memory training cells with the reason recorded; "
                           "a backend that cannot train says why.", (problems,)))
    return out


# --- charts (the HTML report) ----------------------------------------------------------------

def throughput_charts(machine: Machine, model: str, pal: dict[str, str]) -> list[str]:
    """Training tokens/s against batch (one line per series and sequence length) and against
    sequence length (one line per series and batch), where the cells vary along that axis."""
    cells = [c for c in machine.cells if is_train(c) and is_ok(c) and c.get("model") == model
             and _finite(c.get("train_tok_s"))]
    made = []
    for axis, other, name in (("batch", "seq_len", "batch"), ("seq_len", "batch", "sequence length")):
        if len({c.get(axis) for c in cells}) < 2:
            continue
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for c in cells:
            groups[(f"{label(c)} · ckpt {ckpt(c)}", c.get(other), c.get("threads"))].append(c)
        series = []
        for (lab, o, t), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], _none_last(kv[0][1]), _none_last(kv[0][2]))):
            cs = sorted(cs, key=lambda c: c[axis])
            base = pal.get(label(cs[0]), charts.PALETTE[0])
            other_name = "seq" if other == "seq_len" else "batch"
            series.append(Series(f"{lab} · {other_name} {o}", tuple((c[axis], c["train_tok_s"]) for c in cs), base,
                                 dashed=bool(cs[0].get("grad_checkpointing")),
                                 errors=tuple(tuple(c.get("train_tok_s_ci") or (None, None)) for c in cs),
                                 tips=tuple(f"{lab}, {name} {c[axis]}: {num(c['train_tok_s'])} tok/s" for c in cs)))
        xs = sorted({c[axis] for c in cells})
        made.append(charts.xy_chart(f"Training tokens/s against {name} — {model_name(model)}", series,
                                    x_label=name, y_label="training tokens/s", x_log=len(xs) > 2,
                                    x_ticks=[(x, str(x)) for x in xs],
                                    note="dashed: gradient checkpointing on; bars: 95% interval"))
    return made
