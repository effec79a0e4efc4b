"""Render a comparison of two runs: what got faster, what got slower, and what only looks different.

The comparison itself -- matching cells, the hierarchical bootstrap of each change, the noise
floor measured from the runs' drift sentinels -- is computed by ``bench.results.compare.compare_runs``;
these renderers take its result (a ``Comparison``) and only draw it, like every renderer here.
"""

from __future__ import annotations

from reports.format import label, load_text, num, signed_pct, sort_key, threads_label
from reports.markdown import md_escape

FASTER, SLOWER, SAME, NOT_COMPARABLE = "faster", "slower", "no significant change", "not comparable"


# --- rendering ---------------------------------------------------------------------------------

def change_text(m) -> str:
    """'−12.3% (−14.0% to −10.5%)'; the change alone without an interval."""
    if m.ratio is None:
        return "—"
    if m.low is None:
        return signed_pct(m.change)
    return f"{signed_pct(m.change)} ({signed_pct(m.low - 1)} to {signed_pct(m.high - 1)})"


def _where(c: dict) -> str:
    return (f"{c.get('model')} · {label(c)} · batch {c.get('batch')} · "
            f"{threads_label(c.get('threads'))} thr{load_text(c)}")


def _row(c) -> list[str]:
    d = c.decode
    return [str(c.base.get("model")), label(c.base) + load_text(c.base), str(c.base.get("batch")),
            threads_label(c.base.get("threads")),
            f"{num(d.base)} → {num(d.new)}" if d.ratio is not None else "—",
            change_text(d), change_text(c.metrics["ttft_ms"]), change_text(c.metrics["tpot_ms"]),
            change_text(c.metrics["peak_rss_mb"]),
            c.verdict + (f" ({c.note})" if c.note else "")]


COLUMNS = ("model", "backend · precision", "batch", "threads", "decode tok/s", "decode change",
           "TTFT change", "TPOT change", "peak memory change", "verdict")


def _md_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    out += ["| " + " | ".join(md_escape(x) for x in r) + " |" for r in rows]
    return out


def compare_markdown(result) -> str:
    counts = {v: len(result.by_verdict(v)) for v in (FASTER, SLOWER, SAME, NOT_COMPARABLE)}
    lines = [f"# Comparison: {md_escape(result.base_run)} → {md_escape(result.new_run)}", "",
             f"{len(result.cells)} matched cells: **{counts[SLOWER]} slower**, **{counts[FASTER]} faster**, "
             f"{counts[SAME]} no significant change, {counts[NOT_COMPARABLE]} not comparable.", "",
             "Changes are new ÷ base − 1 of the medians, with a 95% interval from a hierarchical bootstrap "
             "of both runs' raw samples (launches, then whole generations). A verdict is faster or slower "
             "only when that interval excludes zero and the decode rate moved by more than the noise floor, "
             f"{result.noise_floor_pct:.1f}% here ({result.noise_floor_source}); peak memory has no spread "
             f"and counts beyond {result.memory_floor_pct:g}%.", ""]
    if result.drift_warning:
        lines += [f"> **Warning: {md_escape(result.drift_warning)}.**", ""]
    if not result.environments_match:
        lines += ["> **Warning: the environments differ**, so a change may come from the environment "
                  "rather than the code:", ">"]
        lines += [f"> - {md_escape(x)}" for x in result.fingerprint_diff] or ["> - (fingerprint ids differ)"]
        lines.append("")
    elif result.fingerprint_diff:
        lines += ["Same environment fingerprint; other differences: "
                  + "; ".join(md_escape(x) for x in result.fingerprint_diff) + ".", ""]
    significant = sorted((c for c in result.cells if c.verdict in (FASTER, SLOWER)),
                         key=lambda c: (c.decode.change, sort_key(c.base)))
    lines += ["## Significant changes", ""]
    lines += (_md_table([_row(c) for c in significant]) if significant
              else ["No cell changed its decode rate significantly."])
    lines.append("")
    broken = result.broken()
    if broken:
        lines += ["## Cells that ran in base and have no result in new", ""]
        lines += [f"- {md_escape(_where(c.base))}: {md_escape(c.note)}" for c in broken]
        lines.append("")
    for title, cells in (("Only in base", result.only_base), ("Only in new", result.only_new)):
        if cells:
            lines += [f"## {title}", ""] + [f"- {md_escape(_where(c))} ({md_escape(str(c.get('status')))})"
                                            for c in cells] + [""]
    lines += ["## All matched cells", "", "<details><summary>Show the table</summary>", ""]
    lines += _md_table([_row(c) for c in result.cells]) + ["", "</details>"]
    return "\n".join(lines) + "\n"


def compare_html(result) -> str:
    """The comparison as an HTML fragment (``bench dashboard``): the counts, any warning, and every
    matched cell with its verdict, slowest change first. Every value is escaped."""
    from html import escape

    counts = {v: len(result.by_verdict(v)) for v in (FASTER, SLOWER, SAME, NOT_COMPARABLE)}
    parts = [f'<p class="lead">{len(result.cells)} matched cells: <strong>{counts[SLOWER]} slower</strong>, '
             f"<strong>{counts[FASTER]} faster</strong>, {counts[SAME]} no significant change, "
             f"{counts[NOT_COMPARABLE]} not comparable. Noise floor {result.noise_floor_pct:.1f}% "
             f"({escape(result.noise_floor_source)}).</p>"]
    warnings = ([result.drift_warning] if result.drift_warning else []) + (
        [f"environments differ: {'; '.join(result.fingerprint_diff)}"] if not result.environments_match else [])
    parts += [f'<p class="warning">Warning: {escape(w)}</p>' for w in warnings]
    tone = {FASTER: "good", SLOWER: "bad", SAME: "muted", NOT_COMPARABLE: "muted"}
    order = sorted(result.cells, key=lambda c: (c.verdict != SLOWER, c.verdict != FASTER,
                                                c.decode.change if c.decode.change is not None else 0,
                                                sort_key(c.base)))
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    body = []
    for c in order:
        *cells, verdict = _row(c)
        tds = "".join(f"<td>{escape(x)}</td>" for x in cells)
        body.append(f'<tr data-verdict="{escape(c.verdict)}">{tds}'
                    f'<td class="{tone[c.verdict]}">{escape(verdict)}</td></tr>')
    parts.append(f'<div class="table-wrap"><table id="table-compare"><thead><tr>{head}</tr></thead>'
                 f'<tbody>{"".join(body)}</tbody></table></div>')
    for title, cells in (("Only in base", result.only_base), ("Only in new", result.only_new)):
        if cells:
            items = "".join(f"<li>{escape(_where(c))} ({escape(str(c.get('status')))})</li>" for c in cells)
            parts.append(f"<h3>{escape(title)}</h3><ul>{items}</ul>")
    return "\n".join(parts)


def compare_table(result):
    """The comparison as a rich Table for the terminal: every matched cell, slowest change first."""
    from rich.markup import escape  # terminal only; the other renderers need nothing but the stdlib
    from rich.table import Table
    from rich.text import Text

    title = escape(f"{result.base_run} → {result.new_run}")
    if not result.environments_match:
        title += f"\n[yellow]environments differ: {escape('; '.join(result.fingerprint_diff))}[/yellow]"
    elif result.fingerprint_diff:
        other = escape("; ".join(result.fingerprint_diff))
        title += f"\n[dim]same environment; other differences: {other}[/dim]"
    title += f"\n[dim]noise floor {result.noise_floor_pct:.1f}%: {escape(result.noise_floor_source)}[/dim]"
    if result.drift_warning:
        title += f"\n[yellow]warning: {escape(result.drift_warning)}[/yellow]"
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(COLUMNS):
        t.add_column(col, justify="right" if 2 <= i <= 8 else "left", no_wrap=i < 9)
    style = {FASTER: "green", SLOWER: "bold red", SAME: "dim", NOT_COMPARABLE: "yellow"}
    order = sorted(result.cells, key=lambda c: (c.verdict != SLOWER, c.verdict != FASTER,
                                                c.decode.change if c.decode.change is not None else 0,
                                                sort_key(c.base)))
    for c in order:
        *cells, verdict = _row(c)
        t.add_row(*(Text(x) for x in cells), Text(verdict, style=style[c.verdict]))
    return t
