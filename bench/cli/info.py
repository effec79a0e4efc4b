"""``bench info``: this machine, its libraries, its measured roofline and every backend's availability."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cli.common import err, out_console, positive_int


def add_parser(sub, default_store: str) -> None:
    info = sub.add_parser("info", help="this machine, library versions and every backend's availability")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.add_argument("--no-roofline", action="store_true", help="skip measuring bandwidth and matmul peak")
    info.add_argument("--threads", type=positive_int, default=None, help="threads for the roofline measurement")
    info.add_argument("--remeasure", action="store_true",
                      help="measure bandwidth and matmul peak again instead of using the cached figures")
    info.set_defaults(fn=cmd_info)


def cmd_info(args) -> int:
    from backends import registry
    from bench.machine.environment import fingerprint
    from reports.terminal import info_tables

    fp = fingerprint()
    probes = {n: p.to_dict() for n, p in registry.probe_all().items()}
    torch_build = _torch_build()
    roofline = None if args.no_roofline else measured_roofline(args.threads, refresh=args.remeasure)
    if args.json:
        print(json.dumps(dict(fingerprint=fp, torch_build=torch_build, roofline=roofline, backends=probes), indent=2))
        return 0
    out = out_console()
    for table in info_tables(fp, torch_build, roofline, probes):
        out.print(table)
    return 0


def _torch_build() -> dict:
    try:
        from backends.mkl import torch_build_info
    except ImportError:
        return {}
    return torch_build_info()


def measured_roofline(threads: int | None, store: str | None = None, refresh: bool = False) -> dict | None:
    """The machine's bandwidth and matmul peaks, measured once and cached beside the store."""
    from bench.machine.roofline import measure_roofline

    cache = Path(store).parent / "roofline.json" if store else None
    err.print("[dim]memory bandwidth and matmul peak: measured once per machine and thread count, then cached "
              "(bench info --remeasure measures again)[/]")
    return measure_roofline(threads=threads, cache=cache, refresh=refresh)
