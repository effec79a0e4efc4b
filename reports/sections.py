"""The report's sections in reading order: the inference sections of a machine's cells, then its training ones.

The assembly of ``reports.format``'s tables (inference) and ``reports.training``'s (training)
into sections, which the Markdown and HTML renderers walk. It sits above both, so neither
imports the other.
"""

from __future__ import annotations

from dataclasses import replace

from reports.format import Machine, Section, model_name, models, params
from reports.tables import (PEERS_TEXT, QUALITY_TEXT, SERVE_TEXT, all_cells_table, best_table, drift_table,
                            drift_text, fastest_table, memory_table, model_table, parity_table, peers_table,
                            problems_table, quality_failures_table, quality_table, scaling_table, serve_table,
                            training_table, unsteady_table)
from reports.training import is_train, training_sections


def sections(machine: Machine) -> list[Section]:
    """The report of one machine, in reading order: the inference sections of its inference
    cells (with its serve cells' section), then, where it has training cells, the training
    sections (``reports.training``)."""
    if machine.serve_cells and not machine.cells:  # load runs only: nothing of generations to show
        return [Section("serving", "Serving under load", SERVE_TEXT, (serve_table(machine),))]
    if not any(is_train(c) for c in machine.cells):
        return inference_sections(machine)
    inference = replace(machine, cells=tuple(c for c in machine.cells if not is_train(c)))
    out = inference_sections(inference) if inference.cells or inference.serve_cells else [
        Section("drift", "Machine drift during the run", drift_text(machine),
                tuple(t for t in (drift_table(machine),) if t is not None))]
    return out + training_sections(machine, list(inference.cells))


def inference_sections(machine: Machine) -> list[Section]:
    """The report of one machine's inference cells, in reading order."""
    names = models(list(machine.cells))
    size = {c.get("model"): c.get("n_params") for c in machine.cells}
    nothing = "No cell ran to the end, so there is nothing to show here."
    best = best_table(machine)
    out = [Section("best", "Best configuration",
                   "Per model size and batch, the fastest decode among cells whose parity check "
                   "passed, with its speed-up over eager fp32 at its own best thread count."
                   if best.rows else nothing, (best,) if best.rows else ())]
    for m in names:
        out.append(Section(f"model-{model_name(m)}", f"Model {model_name(m)} ({params(size.get(m))})",
                           "Rows are backend and precision, columns batch sizes.",
                           (model_table(machine, m),)))
    peers = peers_table(machine)
    if peers is not None:
        fastest = fastest_table(machine)
        out.append(Section("peers", "Against the peers", PEERS_TEXT,
                           ((fastest,) if fastest is not None else ()) + (peers,)))
    scaling = scaling_table(machine)
    if scaling is not None:
        out.append(Section("thread-scaling", "Thread scaling",
                           "Decode tokens/s at each thread count, and the speed-up over the smallest "
                           "thread count; efficiency 100% is perfect linear scaling.", (scaling,)))
    memory = memory_table(machine)
    out.append(Section("memory", "Memory against model size",
                       "Peak resident memory of the cell process (the runtime itself included) and "
                       "the bytes of the weights as the backend holds them." if memory.rows else nothing,
                       (memory,) if memory.rows else ()))
    quality = quality_table(machine)
    if quality is not None:
        training = training_table(machine)
        out.append(Section("quality", "Quality on a trained model", QUALITY_TEXT,
                           (quality,) + ((training,) if training is not None else ())))
    if machine.serve_cells:
        out.append(Section("serving", "Serving under load", SERVE_TEXT, (serve_table(machine),)))
    drift_tables = tuple(t for t in (drift_table(machine), unsteady_table(machine)) if t is not None)
    out.append(Section("drift", "Machine drift during the run", drift_text(machine), drift_tables))
    problems = [t for t in (parity_table(machine), quality_failures_table(machine), problems_table(machine))
                if t is not None]
    out.append(Section("did-not-pass", "Cells that did not pass",
                       "Parity failures ran to the end but gave different answers from eager fp32; quality "
                       "failures lost more of a trained model's quality than the verdict allows; skipped, "
                       "failed, timed-out and out-of-memory cells give the reason recorded."
                       if problems else "Every cell ran and passed its parity check.",
                       tuple(problems)))
    out.append(Section("cells", f"All {len(machine.cells)} cells", "", (all_cells_table(machine),),
                       collapsed=True))
    return out
