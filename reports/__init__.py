"""Renderers: stored run records in, text out. Pure functions; they never run a model.

    render_markdown(runs) -> str        GitHub-flavoured Markdown, for an issue
    render_html(runs) -> str            one self-contained page with inline SVG charts
    compare_markdown(comparison) -> str, compare_table(comparison) -> rich Table: a
        ``bench.results.compare.Comparison`` of two runs, drawn

The content both reports share (sections, tables, number formatting) is in ``reports.format``.
"""

from reports.compare import compare_markdown, compare_table
from reports.html import render_html
from reports.markdown import render_markdown

__all__ = ["compare_markdown", "compare_table", "render_html", "render_markdown"]
