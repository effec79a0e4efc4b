"""A sweep's progress: a bar with an ETA in a terminal, and a line per finished launch either way.

Piped (make, CI, a log file) there is no bar to redraw, so each finished launch's line carries
the count done and the time left, estimated from the launches so far.
"""

from __future__ import annotations

import time

from rich.markup import escape

from bench.cli.common import err


class SweepProgress:
    """``with SweepProgress(sweep, quiet) as events: run_sweep(..., events=events)``."""

    def __init__(self, sweep, quiet: bool):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        from bench.sweep import Events

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("left"), TimeRemainingColumn())
        self.sweep = sweep
        self.live = err.is_terminal
        self.progress = Progress(*columns, console=err, transient=False, disable=not self.live or quiet)
        self.task = None
        self.total = self.done = 0
        self.started = time.monotonic()
        self.events = Events(on_start=self.on_run, on_round=self.on_round, on_launch_start=self.on_start,
                             on_launch_done=self.on_done)

    def __enter__(self):
        self.progress.__enter__()
        return self.events

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def print(self, line: str) -> None:
        self.progress.console.print(line)

    def on_run(self, run_id, cells, stored):
        runnable = sum(not c.skip_reason for c in cells)
        planned = runnable * self.sweep.launches
        if stored is not None:
            self.print(f"resuming run {run_id}: {stored} of {planned} launches already stored")
        if self.sweep.confirm:
            held = sum(c.after_screen and not c.skip_reason for c in cells)
            self.print(f"run {run_id}: {len(cells)} cells ({len(cells) - runnable} skipped): a screen of "
                       f"{runnable - held}, one launch each; then "
                       + ("the fastest that passes" if self.sweep.confirm == 1 else
                          f"the {self.sweep.confirm} fastest that pass")
                       + f" and eager fp32 get {self.sweep.launches} launches"
                       + (f", and so do their {held} cells waiting for the screen" if held else ""))
        else:
            self.print(f"run {run_id}: {len(cells)} cells ({len(cells) - runnable} skipped), "
                       f"{self.sweep.launches} launches each in interleaved rounds")
        skipped: dict[str, list[str]] = {}
        for c in cells:
            if c.skip_reason:
                skipped.setdefault(c.skip_reason, []).append(c.spec.label())
        for reason, labels in skipped.items():  # what will not run, and why, before anything runs
            shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
            self.print(f"[yellow]skipped[/] {escape(shown)}: {escape(reason)}")

    def on_round(self, round_, order, reading, left):
        if self.task is None:  # every launch left to run, counted when the first round starts
            self.task = self.progress.add_task("starting", total=left)
            self.total, self.started = left, time.monotonic()
        elif self.done + left != self.total:  # a screen after the first round changed what is left
            self.total = self.done + left
            self.progress.update(self.task, total=self.total)
            self.print(f"screen: the fastest cells get their other launches; {left} launch(es) left")
        line = f"[bold]round {round_ + 1}[/]: {len(order)} cells in a seeded random order"
        if reading and "decode_ms" in reading:
            line += (f"; sentinel: small decode step {reading['decode_ms']:.3f} ms, "
                     f"gemv {reading['gemv_gb_s']:.1f} GB/s")
        elif reading and reading.get("error"):
            line += f"; {reading['error']}"
        self.print(line)

    def on_start(self, cell, round_, number):
        self.progress.update(self.task, description=f"[bold]{cell.spec.label()}[/] launch {number}")

    def on_done(self, cell, launch, record):
        from reports.terminal import launch_line

        self.progress.advance(self.task)
        self.done += 1
        line = launch_line(cell.spec.label(), launch["status"], record)
        if not self.live:  # no bar: the count and the time left on each line
            line = f"[{self.done}/{self.total}, {eta(time.monotonic() - self.started, self.done, self.total)}] {line}"
        self.print(line)


def eta(elapsed: float, done: int, total: int) -> str:
    """'4m10s left' from the mean time of the launches so far."""
    if done <= 0 or total <= done:
        return "0s left" if total <= done else "? left"
    s = int(round(elapsed / done * (total - done)))
    return (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s") + " left"
