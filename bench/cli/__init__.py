"""The ``bench`` command: a table of commands, each in the module of its group.

Every handler parses its arguments, makes one call into the harness and renders the result
(``reports.terminal`` for tables); the rules of what runs live in ``bench.planner``.

| module     | commands                                  |
|------------|-------------------------------------------|
| info       | info                                      |
| run        | run (inference, train, serve scenarios)   |
| generate   | generate, convert                         |
| results    | runs, export, report, compare             |
| train      | train                                     |
| quality    | quality, quantize                         |
| serve      | serve, load, dashboard                    |
| inspection | inspect                                   |

Bad input (a ``UsageError`` here, an ``InputError`` from below) is one line on stderr and
exit code 2, never a traceback. A backend that cannot do what was asked, or a data-parallel
training worker that died, is one line and exit code 1. Anything else is a bug: its
traceback and exit code 1.

The CLI is the top of the house: it may import anything in ``bench``, ``backends``, ``model``
and ``reports``; nothing imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from bench.cli import generate, info, inspection, quality, results, run, serve, train
from bench.cli.common import EXIT_FAILURE, EXIT_USAGE, OneLineParser, UsageError, err, say
from model.errors import InputError


# The commands in the order `bench --help` lists them: (name, the function adding its parser).
COMMANDS = (
    ("info", info.add_parser), ("run", run.add_parser), ("generate", generate.add_generate),
    ("convert", generate.add_convert), ("runs", results.add_runs), ("export", results.add_export),
    ("report", results.add_report), ("train", train.add_parser), ("quality", quality.add_quality),
    ("serve", serve.add_serve), ("load", serve.add_load), ("quantize", quality.add_quantize),
    ("compare", results.add_compare), ("dashboard", serve.add_dashboard), ("inspect", inspection.add_inspect),
)


def make_parser() -> argparse.ArgumentParser:
    from bench.store import DEFAULT_STORE

    p = OneLineParser(prog="bench", description="Benchmark one GPT model across hardware backends.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for _, add in COMMANDS:
        add(sub, DEFAULT_STORE)
    return p


def _fetch_remote(args) -> None:
    """Every ``s3://`` checkpoint the command names, replaced by its local cached directory
    (``bench.models.localize``), so each command taking ``--checkpoint`` (and ``bench run --model``)
    reads S3 without knowing it. Downloaded once, checked (manifest digests, or S3 sizes and ETags), cached after."""
    from bench.models import localize
    from model.storage import is_remote

    for name in ["checkpoint", "from_checkpoint"] + (["model"] if args.command == "run" else []):
        value = getattr(args, name, None)
        local = localize(value)
        if local != value:
            for uri, path in zip(value.split(","), local.split(",")):
                if is_remote(uri.strip()):
                    say(f"{uri.strip()}: checked and cached at {path}")  # a size-only check printed its note
            setattr(args, name, local)


# What Ctrl-C leaves behind, per command. The servers stop on it: uvicorn shuts down gracefully,
# then raises the signal again, so the exit code is still 130.
INTERRUPTED = {
    "run": "interrupted: finished cells are already stored (bench run --resume continues)",
    "serve": "stopped", "dashboard": "stopped",
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    command = None
    try:
        args = make_parser().parse_args(argv)
        command = args.command
        _fetch_remote(args)
        return args.fn(args)
    except (UsageError, InputError) as e:
        # Config, preset, backend, precision, checkpoint, sweep, store and prompt errors.
        err.print(f"error: {e}", markup=False)
        return EXIT_USAGE
    except Exception as e:
        from backends.base import BackendError
        from model.distributed import WorkerFailed

        if isinstance(e, (BackendError, WorkerFailed)):  # a backend that cannot; a training worker that died
            err.print(f"error: {e}", markup=False)
            return EXIT_FAILURE
        traceback.print_exc()
        err.print("error: an unexpected exception, which is a bug in bench; the traceback above says where",
                  markup=False)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        err.print(INTERRUPTED.get(command, "interrupted"), markup=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
