"""Runs -> GitHub-flavoured Markdown, fit to paste into an issue.

The content (sections, tables, numbers) comes from ``reports.format``; this module only writes
it as Markdown. Values from the store are escaped so a reason with ``|`` or ``<`` cannot break
a table or inject HTML. The output is deterministic: the same runs give the same bytes.
"""

from __future__ import annotations

from reports.format import HOW_TO_READ, Machine, Section, Table, environment, group_runs
from reports.sections import sections


def md_escape(s: str) -> str:
    """Escape what GitHub would read as table syntax or HTML (``>`` only matters at a line's start,
    and every value is written after a prefix)."""
    return (s.replace("&", "&amp;").replace("<", "&lt;")
            .replace("|", "\\|").replace("\r", " ").replace("\n", " "))


def table_md(t: Table) -> list[str]:
    head = "| " + " | ".join(md_escape(c) for c in t.columns) + " |"
    rule = "|" + "|".join("---:" if n else "---" for n in t.numeric) + "|"
    lines = [f"*{md_escape(t.caption)}*", "", head, rule] if t.caption else [head, rule]
    for row in t.rows:
        shown = []
        for cell in row:
            parts = [md_escape(s) for s in cell.lines]
            if cell.strong and parts:
                parts[0] = f"**{parts[0]}**"
            shown.append("<br>".join(parts))
        lines.append("| " + " | ".join(shown) + " |")
    return lines


def section_md(s: Section, level: int) -> list[str]:
    lines = [f"{'#' * level} {md_escape(s.title)}", ""]
    if s.collapsed:
        lines += ["<details><summary>Show the table</summary>", ""]
    if s.text:
        lines += [md_escape(s.text), ""]
    for t in s.tables:
        lines += table_md(t) + [""]
    if s.collapsed:
        lines += ["</details>", ""]
    return lines


def machine_md(m: Machine, level: int) -> list[str]:
    lines = [f"{'#' * level} Environment", ""]
    lines += [f"- **{field}**: {md_escape(value)}" for field, value in environment(m)]
    lines.append("")
    for s in sections(m):
        lines += section_md(s, level)
    return lines


def render_markdown(runs: list[dict]) -> str:
    """The whole report. Runs that share a fingerprint are merged; others get a section each."""
    machines = group_runs(runs)
    n_cells = sum(len(m.cells) + len(m.serve_cells) for m in machines)
    lines = ["# Benchmark report", "",
             f"{len(runs)} run{'s' * (len(runs) != 1)}, {n_cells} cells"
             + (f", {len(machines)} environments (never mixed in one table)" if len(machines) > 1 else "")
             + ".", "",
             f"**How to read this.** {HOW_TO_READ}", ""]
    for i, m in enumerate(machines, 1):
        if len(machines) > 1:
            cpu = (m.fingerprint.get("cpu") or {}).get("brand", "?")
            lines += [f"## Environment {i} of {len(machines)}: {md_escape(str(cpu))}, "
                      f"fingerprint {md_escape(m.fingerprint_id[:12])}", ""]
        lines += machine_md(m, 3 if len(machines) > 1 else 2)
    return "\n".join(lines).rstrip() + "\n"
