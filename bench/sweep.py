"""Running a plan: interleaved rounds of launches, each committed to the store as it lands.

``bench.planner.plan`` decides what runs. ``run_sweep`` runs the rest in *rounds*. Each round
visits every cell that still needs a launch once, in a fresh order drawn from the sweep's seed
and the round number (stored with the round), and each visit is one *launch*: the cell in a
fresh process (``bench.executors.cell``), on this machine or where the executor puts it
(``bench.executors``: this machine, or a Ray cluster's node). Interleaving is what makes a
sweep reproduce: a machine that drifts over minutes slows a little of every cell instead of
all of a few (Google Benchmark's ``--benchmark_enable_random_interleaving``, asv's
A B C ... A' B' C' sampling). At the start of every round the drift sentinel
(``bench.machine.sentinel``) is read. Every launch is committed to the store the moment it
finishes and the cell's record is derived again from its stored launches
(``bench.results.records.cell_record``), so Ctrl-C or a crash loses nothing finished, and
``--resume`` continues from the last stored launch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Callable

from bench.executors.local import Job, LocalExecutor
from bench.machine.environment import fingerprint_id
from bench.models import model_config
from bench.planner import Planned, Roofline, Sweep, plan
from bench.results.records import cell_record, skipped_record
from bench.spec import CellSpec


@dataclass
class _CellState:
    """Where one runnable cell stands in a run: its attempt, its launches so far, its stored row."""

    planned: Planned
    n_params: int | None = None  # read once from the preset or checkpoint config
    attempt: int = 0
    launches: list[dict] = field(default_factory=list)  # this attempt's launch records, in order
    row_id: int | None = None
    target: int = 1  # the launches it is to get (after a screen: 1 for a cell screened out)
    record: dict | None = None  # its latest cell record
    screen: str | None = None  # what the screen decided, when the sweep has one

    @property
    def ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.launches)

    @property
    def failed(self) -> bool:
        return any(r["status"] != "ok" for r in self.launches)


@dataclass
class Events:
    """Callbacks the CLI uses to show progress; all optional."""

    on_start: Callable[[str, list[Planned], int | None], None] | None = None  # run id, plan, launches stored
    on_round: Callable[[int, list[Planned], dict | None, int], None] | None = None  # ..., launches left
    on_launch_start: Callable[[Planned, int, int], None] | None = None  # cell, round, launch number
    on_launch_done: Callable[[Planned, dict, dict], None] | None = None  # cell, launch, cell record


def round_order(cells: list[Planned], seed: int, round_: int) -> list[Planned]:
    """The cells in the seeded random order of one round: the same seed and round, the same order."""
    order = sorted(cells, key=lambda c: c.key)
    random.Random(f"{seed}/round/{round_}").shuffle(order)
    return order


def _resume_state(store, run_id: str, states: dict[str, _CellState]) -> int:
    """Load the stored launches of a run into ``states``; returns the next round number.

    A cell whose latest attempt failed starts a new attempt (its stored launches stay in the
    store, kept out of the new record); an ok cell keeps its launches and gets the rest.
    """
    latest = store.latest_cells(run_id)
    for key, (row_id, record) in latest.items():
        if key in states:
            state = states[key]
            state.row_id, state.record = row_id, record
            state.attempt = record.get("attempt", 0)
    for launch in store.launches(run_id):
        state = states.get(launch["key"])
        if state is not None and launch["record"].get("attempt", 0) == state.attempt:
            state.launches.append(launch["record"])
    for state in states.values():
        if state.failed:
            state.attempt += 1
            state.launches, state.row_id, state.record = [], None, None
    rounds = store.rounds(run_id)
    return rounds[-1]["round"] + 1 if rounds else 0


def run_sweep(sweep: Sweep, store, probes: dict, fingerprint: dict, *, roofline: Roofline | None = None,
              name: str | None = None, resume: bool = False, events: Events | None = None,
              sentinel: Callable[[int | None], dict] | None = None, timeout_s: float | None = None,
              executor=None) -> str:
    """Plan the sweep, store it and run it in interleaved rounds; returns the run id.

    ``probes``: backend name -> Probe (unavailable backends become skipped cells with the
    reason). ``fingerprint``: the environment (``bench.machine.environment.fingerprint()``), stored with the
    run; its ISA picks the default reduced precisions. ``roofline``: see ``plan``.
    ``sentinel(threads) -> reading``: the drift sentinel (default ``bench.machine.sentinel.read_isolated``).
    ``executor``: where the launches run (``bench.executors.local``; default ``LocalExecutor``, this machine).
    A KeyboardInterrupt marks the run interrupted and propagates; every finished launch is stored.
    """
    events = events or Events()
    executor = executor or LocalExecutor()
    if sentinel is None:
        from bench.machine.sentinel import read_isolated as sentinel
    cells = executor.place(plan(sweep, probes, roofline, isa=(fingerprint.get("cpu") or {}).get("isa"),
                                available_bytes=executor.available_bytes))
    fingerprint = executor.run_fingerprint(dict(fingerprint, **_rooflines(cells)))
    key = executor.resume_key(sweep.key())
    run_id = store.find_resumable(key, fingerprint_id(fingerprint)) if resume else None
    if run_id is None:
        run_id = store.create_run(fingerprint, dict(sweep.to_dict(), sweep_key=key), name=name)
    else:
        store.reopen_run(run_id)
    states = {c.key: _CellState(c, _n_params(c.spec)) for c in cells if not c.skip_reason}
    next_round = _resume_state(store, run_id, states) if resume else 0
    if events.on_start:
        events.on_start(run_id, cells, sum(s.ok for s in states.values()) if resume else None)
    stored = store.latest_cells(run_id)
    for c in cells:
        if c.skip_reason and c.key not in stored:
            store.add_cell(run_id, skipped_record(c.spec, c.skip_reason, _n_params(c.spec)))
    for state in states.values():  # a screen: one launch each first; a part after it waits
        state.target = 0 if state.planned.after_screen else 1 if sweep.confirm else sweep.launches
    screened = False
    sentinel_threads = max((t for part in (sweep, *sweep.also) for t in part.threads if t), default=None)
    round_ = next_round
    try:
        while True:
            screening = {k: s for k, s in states.items() if not s.planned.after_screen}
            if sweep.confirm and not screened and all(s.failed or s.ok for s in screening.values()):
                screened = True
                decided = screen(screening, sweep.confirm, sweep.launches)
                for state in decided:
                    state.record.update(launches_planned=state.target, screen=state.screen)
                    store.update_cell(state.row_id, state.record)
                _release(states, decided, sweep.launches, lambda spec, reason, n: None if spec.id in stored else
                         store.add_cell(run_id, skipped_record(spec, reason, n)))
            todo = [s.planned for s in states.values() if not s.failed and s.ok < s.target]
            if not todo:
                break
            order = round_order(todo, sweep.seed, round_)
            reading = dict(executor.sentinel(sentinel, sentinel_threads), round=round_)
            store.add_round(run_id, round_, [c.key for c in order], reading)
            if events.on_round:
                left = sum(s.target - s.ok for s in states.values() if not s.failed)
                events.on_round(round_, order, reading, left)
            jobs = [Job(c.key, (c.spec if states[c.key].ok == 0 else c.spec.later_launch()).to_dict(),
                        states[c.key].ok + 1, _launch_fingerprint(states[c.key].launches), c.peak_bytes) for c in order]

            def started(job, round_=round_):
                if events.on_launch_start:
                    events.on_launch_start(states[job.key].planned, round_, job.number)

            for job, launch in executor.run(jobs, timeout_s or sweep.timeout_s, started):
                state = states[job.key]
                cell = state.planned
                launch.update(round=round_, attempt=state.attempt)
                launch.setdefault("sentinel", reading)  # an executor on several machines gives each its own
                store.add_launch(run_id, cell.key, round_, launch)
                state.launches.append(launch)
                record = cell_record(cell.spec, state.launches, state.target, state.n_params)
                record["attempt"] = state.attempt
                if state.screen:
                    record["screen"] = state.screen
                state.record = record
                record.update(_where(state.launches))
                if state.row_id is None:
                    state.row_id = store.add_cell(run_id, record)
                else:
                    store.update_cell(state.row_id, record)
                if events.on_launch_done:
                    events.on_launch_done(cell, launch, record)
            round_ += 1
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted")
        raise
    finally:
        executor.close()
    store.finish_run(run_id, "finished")
    return run_id


def screen(states: dict[str, _CellState], confirm: int, launches: int) -> list[_CellState]:
    """After every cell's first launch: which get all ``launches`` and which keep the one they had.

    In each group of cells that answer one question (model, batch, threads and lengths), the
    ``confirm`` fastest that passed parity and quality (ours and the peers alike: a user would run
    either) and eager fp32 (the reference every speed-up is measured against) are confirmed; the
    rest are screened out, their note saying by how much. A launch can land 2x slow on a shared
    machine, so a larger ``confirm`` leaves room; a screened-out figure is one process's and the
    report says so. Returns the states it decided, in order."""
    groups: dict[tuple, list[_CellState]] = {}
    for state in states.values():
        if state.record is None or state.failed:
            continue
        spec = state.planned.spec
        groups.setdefault((spec.model, spec.batch, spec.threads, spec.scenario, spec.prompt_len, spec.gen_len,
                           spec.seq_len, spec.grad_checkpointing), []).append(state)
    decided = []
    for members in groups.values():
        ranked = sorted((s for s in members if _acceptable(s.record) and _rate(s.record) is not None),
                        key=lambda s: -_rate(s.record))
        keep = {id(s) for s in ranked[:confirm]}  # ours and the peers alike: a user would run either
        best = _rate(ranked[0].record) if ranked else None
        for s in members:
            spec = s.planned.spec
            if id(s) in keep or (spec.backend, spec.precision) == ("eager", "fp32"):
                s.target, s.screen = launches, "confirmed after one launch: " + (
                    "the reference" if (spec.backend, spec.precision) == ("eager", "fp32") else
                    "the fastest" if confirm == 1 else f"among the {confirm} fastest")
            else:
                rate = _rate(s.record)
                s.target, s.screen = 1, ("screened out after one launch: " + (
                    f"{rate:.3g} tok/s against the fastest's {best:.3g}" if _acceptable(s.record) and rate and best
                    else "it did not pass parity or quality"))
            decided.append(s)
    return decided


def _pair(spec: CellSpec) -> tuple:
    return spec.backend, spec.precision, json.dumps(spec.options or {}, sort_keys=True)


def _release(states: dict[str, _CellState], decided: list[_CellState], launches: int, skip) -> None:
    """The cells of the parts after the screen: those of a confirmed (backend, precision, options)
    get every launch; the rest leave the run, stored as skipped (``skip(spec, reason, n_params)``).

    A model the screen measured takes its own finalists (gpt2 at batch 4 runs what won on gpt2);
    a model it did not (a trained checkpoint) takes those of the screened models of its family
    (GPT-2 or Llama), and failing that every finalist: a family's winner is not assumed to be
    the other family's."""
    by_model: dict[str, set] = {}
    for s in decided:
        if s.screen.startswith("confirmed"):
            by_model.setdefault(s.planned.spec.model, set()).add(_pair(s.planned.spec))
    by_family: dict[str | None, set] = {}
    for model, pairs in by_model.items():
        by_family.setdefault(_family(model), set()).update(pairs)
    every = set().union(*by_model.values()) if by_model else set()
    for key, state in list(states.items()):
        if not state.planned.after_screen:
            continue
        spec = state.planned.spec
        finalists = by_model.get(spec.model) or by_family.get(_family(spec.model)) or every
        if _pair(spec) in finalists:
            state.target, state.screen = launches, "a finalist of the screen: confirmed there, so it runs here"
        else:
            del states[key]
            skip(spec, f"screened out: {spec.backend}/{spec.precision} was not among the fastest at the screen",
                 state.n_params)


def _family(model: str) -> str | None:
    """"gpt2" or "llama" for a preset or checkpoint (``GPTConfig.family``); None if it cannot be read."""
    try:
        return model_config(model).family
    except Exception:  # an unreadable model fails in its own cell, with its own message
        return None


def _rate(record: dict) -> float | None:
    return record.get("train_tok_s") if record.get("scenario") == "train" else record.get("decode_tok_s")


def _acceptable(record: dict) -> bool:
    """Parity passed (or it is the reference, or was not checked) and the quality verdict, where
    measured, did not fail."""
    parity = record.get("parity")  # None: not checked (--no-parity), which is not a failure
    quality = ((record.get("quality") or {}).get("verdict") or {}).get("verdict")
    return record.get("status") == "ok" and (parity is None or bool(parity.get("passed") or parity.get("reference"))) \
        and quality != "fail"


def _launch_fingerprint(launches: list[dict]) -> str | None:
    """The fingerprint id of the machine a cell's launches ran on, when an executor said (None locally)."""
    return next((r["fingerprint_id"] for r in launches if r.get("fingerprint_id")), None)


def _where(launches: list[dict]) -> dict:
    """The measuring machine's fingerprint id and node, for a cell whose launches an executor ran
    elsewhere (reports group cells by it); nothing for local launches, which the run's fingerprint covers."""
    fp = _launch_fingerprint(launches)
    if fp is None:
        return {}
    node = next(r["node"] for r in launches if r.get("fingerprint_id") == fp)
    return dict(fingerprint_id=fp, node=node)


def _rooflines(cells: list[Planned]) -> dict:
    """The rooflines the cells were bounded by, for the run's record: ``rooflines`` maps
    "device/threads=N" to each; ``roofline`` is the CPU's at the most threads (the one a report
    shows in its environment lines)."""
    found = {}
    for c in cells:
        if c.spec.roofline:
            t = "default" if c.spec.threads is None else c.spec.threads
            found[f"{c.spec.device}/threads={t}"] = c.spec.roofline
    cpu = [c.spec for c in cells if c.spec.roofline and c.spec.device == "cpu"]
    top = max(cpu, key=lambda s: s.threads or 0, default=None)
    return dict(rooflines=found, roofline=top.roofline if top else None)


def _n_params(spec: CellSpec) -> int | None:
    try:
        return model_config(spec.model, spec.checkpoint).n_params
    except (OSError, ValueError):  # an unreadable checkpoint: the cell's own launch says why
        return None
