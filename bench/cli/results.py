"""Stored runs: ``bench runs``, ``bench export``, ``bench report`` and ``bench compare``."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.cli.common import EXIT_FAILURE, UsageError, err, out_console, percent


def add_runs(sub, default_store: str) -> None:
    runs = sub.add_parser("runs", help="list stored runs")
    runs.add_argument("--store", default=default_store)
    runs.set_defaults(fn=cmd_runs)


def add_export(sub, default_store: str) -> None:
    export = sub.add_parser("export", help="write a run's cells as JSON or CSV")
    export.add_argument("run", help="a run id, or 'latest'")
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--out", help="a file (default: standard output)")
    export.add_argument("--to", help="upload to s3://bucket/key instead (credentials and endpoint from the AWS "
                                     "environment: AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ENDPOINT_URL, ~/.aws/config)")
    export.add_argument("--store", default=default_store)
    export.set_defaults(fn=cmd_export)


def add_report(sub, default_store: str) -> None:
    report = sub.add_parser("report", help="render runs as Markdown and/or self-contained HTML")
    report.add_argument("runs", nargs="*", help="run ids (default: the latest run)")
    report.add_argument("--format", choices=("md", "html", "both"), default="both")
    report.add_argument("--out", default="runs/report", help="output directory (default runs/report)")
    report.add_argument("--store", default=default_store)
    report.set_defaults(fn=cmd_report)


def add_compare(sub, default_store: str) -> None:
    compare = sub.add_parser("compare", help="compare two runs cell by cell")
    compare.add_argument("base")
    compare.add_argument("new")
    compare.add_argument("--fail-above", type=percent, default=None,
                         help="exit 1 when any cell's decode rate regresses by more than this percent")
    compare.add_argument("--noise-floor", type=percent, default=None,
                         help="percent a change must exceed to count (default: measured from the two runs' "
                              "drift sentinels)")
    compare.add_argument("--format", choices=("table", "md"), default="table")
    compare.add_argument("--store", default=default_store)
    compare.set_defaults(fn=cmd_compare)


def write(path: Path, text: str) -> None:
    """Write an output file the user named; a path that cannot be written is bad input."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def cmd_runs(args) -> int:
    from bench.store import Store
    from reports.terminal import runs_table

    runs = Store(args.store).list_runs()
    out_console().print(runs_table(runs, args.store) if runs else "no runs stored yet: try `bench run`")
    return 0


def cmd_export(args) -> int:
    from bench.store import Store, export_csv, export_json

    run = Store(args.store).get_run(args.run)
    text = export_json(run) if args.format == "json" else export_csv(run)
    if args.to:
        from model.storage import is_remote, upload_file

        if not is_remote(args.to):
            raise UsageError(f"bench export: --to {args.to!r} must be s3://bucket/key (--out writes a local file)")
        upload_file(text.encode("utf-8"), args.to, "application/json" if args.format == "json" else "text/csv")
        err.print(f"uploaded {args.to}")
    elif args.out:
        write(Path(args.out), text)
        err.print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_report(args) -> int:
    from bench.store import Store

    store = Store(args.store)
    runs = [store.with_training(store.get_run(r)) for r in (args.runs or ["latest"])]
    for path in write_reports(runs, Path(args.out), args.format):
        print(f"wrote {path}")
    return 0


def write_reports(runs: list[dict], out: Path, fmt: str = "both") -> list[Path]:
    """report.md and/or report.html of stored runs in ``out``; the paths written."""
    from reports.html import render_html  # the renderers take stored records only
    from reports.markdown import render_markdown

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"bench report: cannot create --out {str(out)!r}: {e.strerror or e}") from None
    written = []
    if fmt in ("md", "both"):
        write(out / "report.md", render_markdown(runs))
        written.append(out / "report.md")
    if fmt in ("html", "both"):
        write(out / "report.html", render_html(runs))
        written.append(out / "report.html")
    return written


def cmd_compare(args) -> int:
    from bench.results.compare import compare_runs
    from bench.store import Store
    from reports.compare import compare_markdown, compare_table

    store = Store(args.store)
    result = compare_runs(store.get_run(args.base), store.get_run(args.new), noise_floor_pct=args.noise_floor)
    if not result.environments_match:
        for line in result.fingerprint_diff:
            err.print(f"[yellow]warning: environments differ:[/] {line}")
    if result.drift_warning:
        err.print(f"[yellow]warning:[/] {result.drift_warning}")
    if args.format == "md":
        print(compare_markdown(result))
    else:
        out_console().print(compare_table(result))
    if args.fail_above is not None:
        worse = result.regressions(args.fail_above)
        if worse:
            err.print(f"[red]{len(worse)} cell(s) regressed by more than {args.fail_above}%[/]")
            return EXIT_FAILURE
    return 0
