"""Charts as inline SVG strings: no JavaScript, no library, nothing fetched.

Two kinds cover the report: ``xy_chart`` (lines and/or points on linear or log axes, with
optional error bars and dashed guide lines) and ``box_chart`` (horizontal box plots over raw
samples, every sample drawn as a dot). Every drawn datum carries ``class="mark"`` so a test can
tell an empty frame from a chart, and a ``<title>`` so hovering a point names it. All text is
escaped: labels come from the store.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from html import escape

from reports.format import num

# Tableau 10: distinct in print and for the common colour-vision deficiencies.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
INK, GRID, MUTED = "#222", "#e3e3e3", "#666"

WIDTH, HEIGHT = 640, 360
LEFT, TOP, BOTTOM = 64, 52, 50  # room for the y ticks, the title and its note, the x label
LEGEND_W = 168
MAX_DOTS = 100  # per box: more dots than this only blur into a bar and bloat the file


def colors(labels: list[str]) -> dict[str, str]:
    """A fixed colour per series label, so one backend has one colour in every chart."""
    return {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(sorted(set(labels)))}


@dataclass(frozen=True)
class Series:
    label: str
    points: tuple[tuple[float, float], ...]
    color: str
    line: bool = True
    marker: bool = True
    dashed: bool = False
    hollow: bool = False  # an open ring, for points that highlight others (the Pareto front)
    errors: tuple[tuple[float | None, float | None], ...] | None = None  # y interval per point
    tips: tuple[str, ...] | None = None  # hover text per point
    end_label: str = ""  # written at the last point (guide lines)
    legend: bool = True


# --- scales ------------------------------------------------------------------------------------

def _nice_step(span: float, n: int) -> float:
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def linear_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round ticks covering [lo, hi]; the first and last tick are the new domain."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    step = _nice_step(hi - lo, n)
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(start, stop + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks over [lo, hi], widened to the nearest tick; only powers of ten when crowded."""
    lo, hi = max(lo, 1e-12), max(hi, lo * 1.0001)
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    below = [t for t in ticks if t <= lo * (1 + 1e-9)]
    above = [t for t in ticks if t >= hi * (1 - 1e-9)]
    inside = [t for t in ticks if below[-1] <= t <= above[0]]
    if len(inside) > 8:  # crowded: whole decades only
        first, last = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
        inside = [10.0 ** e for e in range(first, last + 1)]
    return inside


@dataclass(frozen=True)
class Scale:
    lo: float
    hi: float
    px_lo: float
    px_hi: float
    log: bool = False

    def __call__(self, v: float) -> float:
        if self.log:
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / (self.hi - self.lo)
        return self.px_lo + f * (self.px_hi - self.px_lo)


def tick(t: float) -> str:
    """A tick label: as short as the value allows (0.2, 1, 2,500)."""
    return f"{t:,.0f}" if abs(t) >= 1000 else f"{t:g}"


def _f(x: float) -> str:
    return f"{x:.1f}"


def _text(x: float, y: float, s: str, anchor: str = "start", cls: str = "", extra: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{c}{extra}>{escape(s)}</text>'


def _frame(title: str, width: int, height: int, body: list[str], note: str = "") -> str:
    head = (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" '
            f'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="12">')
    parts = [head, f"<title>{escape(title)}</title>",
             _text(LEFT, 20, title, cls="chart-title", extra=' font-size="14" font-weight="600"')]
    if note:
        parts.append(_text(LEFT, 36, note, extra=f' fill="{MUTED}" font-size="11"'))
    return "\n".join(parts + body + ["</svg>"])


def _domain(values: list[float], log: bool, zero: bool) -> list[float]:
    if log:
        return log_ticks(min(values), max(values))
    lo = min(0.0, min(values)) if zero else min(values)
    return linear_ticks(lo, max(values))


def _legend(series: list[Series], x: float, y: float) -> list[str]:
    out = []
    for s in (s for s in series if s.legend):
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        if s.line:
            out.append(f'<line x1="{_f(x)}" y1="{_f(y - 4)}" x2="{_f(x + 22)}" y2="{_f(y - 4)}" '
                       f'stroke="{s.color}" stroke-width="2"{dash}/>')
        if s.marker:
            fill = "none" if s.hollow else s.color
            out.append(f'<circle cx="{_f(x + 11)}" cy="{_f(y - 4)}" r="{5 if s.hollow else 3.5}" '
                       f'fill="{fill}" stroke="{s.color}" stroke-width="1.5"/>')
        out.append(_text(x + 30, y, s.label))
        y += 18
    return out


def xy_chart(title: str, series: list[Series], *, x_label: str, y_label: str, x_log: bool = False,
             y_log: bool = False, x_ticks: list[tuple[float, str]] | None = None, y_zero: bool = True,
             note: str = "") -> str:
    """Lines and points. ``x_ticks`` puts ticks at given values (batch sizes, thread counts)."""
    pts = [p for s in series for p in s.points]
    if not pts:
        raise ValueError(f"chart {title!r} has no points to draw")
    errs = [v for s in series for e in (s.errors or ()) for v in e if v is not None]
    ys = [p[1] for p in pts] + errs
    xs = [p[0] for p in pts] + ([v for v, _ in x_ticks] if x_ticks else [])
    legend = any(s.legend for s in series)
    right = WIDTH - (LEGEND_W if legend else 24)
    x_dom = sorted({v for v, _ in x_ticks}) if x_ticks else _domain(xs, x_log, zero=False)
    y_dom = _domain(ys, y_log, zero=y_zero and not y_log)
    if x_ticks and not x_log:  # a little air so the end points do not sit on the frame
        pad = (x_dom[-1] - x_dom[0]) * 0.06 or 0.5
        xs_scale = Scale(x_dom[0] - pad, x_dom[-1] + pad, LEFT, right)
    elif x_ticks:
        pad = (x_dom[-1] / x_dom[0]) ** 0.06 if x_dom[-1] > x_dom[0] else 2.0
        xs_scale = Scale(x_dom[0] / pad, x_dom[-1] * pad, LEFT, right, log=True)
    else:
        xs_scale = Scale(x_dom[0], x_dom[-1], LEFT, right, log=x_log)
    bottom = HEIGHT - BOTTOM
    ys_scale = Scale(y_dom[0], y_dom[-1], bottom, TOP, log=y_log)

    body = [f'<g class="grid" stroke="{GRID}" stroke-width="1">']
    for t in y_dom:
        body.append(f'<line x1="{LEFT}" x2="{_f(right)}" y1="{_f(ys_scale(t))}" y2="{_f(ys_scale(t))}"/>')
    body.append("</g>")
    body.append(f'<g class="axes" fill="{MUTED}">')
    for t in y_dom:
        body.append(_text(LEFT - 6, ys_scale(t) + 4, tick(t), anchor="end"))
    for v, lab in (x_ticks or [(t, tick(t)) for t in x_dom]):
        body.append(f'<line x1="{_f(xs_scale(v))}" x2="{_f(xs_scale(v))}" y1="{bottom}" '
                    f'y2="{bottom + 4}" stroke="{MUTED}"/>')
        body.append(_text(xs_scale(v), bottom + 17, lab, anchor="middle"))
    body.append(f'<line x1="{LEFT}" x2="{_f(right)}" y1="{bottom}" y2="{bottom}" stroke="{MUTED}"/>')
    body.append(_text((LEFT + right) / 2, HEIGHT - 10, x_label + (" (log scale)" if x_log else ""),
                      anchor="middle", extra=f' fill="{INK}"'))
    cy = (TOP + bottom) / 2
    body.append(_text(16, cy, y_label + (" (log scale)" if y_log else ""), anchor="middle",
                      extra=f' fill="{INK}" transform="rotate(-90 16 {_f(cy)})"'))
    body.append("</g>")

    for s in series:
        xy = [(xs_scale(x), ys_scale(y)) for x, y in sorted(s.points)]
        body.append(f'<g class="series" data-label="{escape(s.label)}">')
        if s.line and len(xy) > 1:
            dash = ' stroke-dasharray="5 4"' if s.dashed else ""
            d = "M" + " L".join(f"{_f(x)},{_f(y)}" for x, y in xy)
            body.append(f'<path class="mark" d="{d}" fill="none" stroke="{s.color}" '
                        f'stroke-width="{1.5 if s.dashed else 2}"{dash}/>')
        order = sorted(range(len(s.points)), key=lambda i: s.points[i])
        for i in order:
            x, y = xs_scale(s.points[i][0]), ys_scale(s.points[i][1])
            err = s.errors[i] if s.errors else (None, None)
            if err[0] is not None and err[1] is not None:
                y0, y1 = ys_scale(err[0]), ys_scale(err[1])
                body.append(f'<path class="mark err" d="M{_f(x)},{_f(y0)} V{_f(y1)} M{_f(x - 4)},{_f(y0)} '
                            f'H{_f(x + 4)} M{_f(x - 4)},{_f(y1)} H{_f(x + 4)}" stroke="{s.color}" '
                            f'stroke-width="1.2" fill="none"/>')
            if s.marker:
                fill = "none" if s.hollow else s.color
                tip = f"<title>{escape(s.tips[i])}</title>" if s.tips else ""
                body.append(f'<circle class="mark" cx="{_f(x)}" cy="{_f(y)}" r="{7 if s.hollow else 3.5}" '
                            f'fill="{fill}" stroke="{s.color if s.hollow else "#fff"}" '
                            f'stroke-width="{1.6 if s.hollow else 0.8}">{tip}</circle>')
        if s.end_label and xy:
            x, y = xy[-1]
            body.append(_text(x - 4, y - 6, s.end_label, anchor="end",
                              extra=f' fill="{s.color}" font-size="11"'))
        body.append("</g>")
    if legend:
        body += _legend(series, right + 14, TOP + 8)
    return _frame(title, WIDTH, HEIGHT, body, note)


def box_chart(title: str, groups: list[tuple[str, list[float], str]], *, x_label: str, note: str = "") -> str:
    """One horizontal box per (label, samples, colour): quartiles, median, whiskers to the furthest
    sample within 1.5 IQR, and the samples as dots (the distribution, not only its summary): every
    sample up to ``MAX_DOTS``, beyond that ``MAX_DOTS`` evenly spaced order statistics, which keep
    the shape. The box and whiskers always use every sample."""
    groups = [(lab, sorted(v), c) for lab, v, c in groups if v]
    if not groups:
        raise ValueError(f"chart {title!r} has no samples to draw")
    label_w = 14 + 7 * max(len(lab) for lab, _, _ in groups)
    left, right, row_h = max(LEFT, label_w), WIDTH - 24, 30
    height = TOP + row_h * len(groups) + BOTTOM + 6
    bottom = height - BOTTOM
    every = [v for _, vs, _ in groups for v in vs]
    dom = linear_ticks(min(every), max(every))
    xs = Scale(dom[0], dom[-1], left, right)

    body = [f'<g class="grid" stroke="{GRID}">']
    body += [f'<line x1="{_f(xs(t))}" x2="{_f(xs(t))}" y1="{TOP}" y2="{bottom}"/>' for t in dom]
    body.append("</g>")
    body.append(f'<g class="axes" fill="{MUTED}">')
    body += [_text(xs(t), bottom + 17, tick(t), anchor="middle") for t in dom]
    body.append(f'<line x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="{MUTED}"/>')
    body.append(_text((left + right) / 2, height - 10, x_label, anchor="middle", extra=f' fill="{INK}"'))
    body.append("</g>")
    for row, (lab, vs, color) in enumerate(groups):
        cy = TOP + row_h * row + row_h / 2
        q1, med, q3 = statistics.quantiles(vs, n=4, method="inclusive") if len(vs) > 1 else (vs[0],) * 3
        iqr = q3 - q1
        lo = min(v for v in vs if v >= q1 - 1.5 * iqr)
        hi = max(v for v in vs if v <= q3 + 1.5 * iqr)
        tip = escape(f"{lab}: median {num(med)}, quartiles {num(q1)}–{num(q3)}, n={len(vs)}")
        body.append(f'<g class="series" data-label="{escape(lab)}">')
        body.append(_text(left - 8, cy + 4, lab, anchor="end", extra=f' fill="{INK}"'))
        body.append(f'<path class="mark" d="M{_f(xs(lo))},{_f(cy)} H{_f(xs(q1))} M{_f(xs(q3))},{_f(cy)} '
                    f'H{_f(xs(hi))} M{_f(xs(lo))},{_f(cy - 5)} V{_f(cy + 5)} M{_f(xs(hi))},{_f(cy - 5)} '
                    f'V{_f(cy + 5)}" stroke="{color}" stroke-width="1.3" fill="none"/>')
        body.append(f'<rect class="mark" x="{_f(xs(q1))}" y="{_f(cy - 9)}" '
                    f'width="{_f(max(xs(q3) - xs(q1), 1))}" height="18" fill="{color}" fill-opacity="0.22" '
                    f'stroke="{color}" stroke-width="1.3">'
                    f'<title>{tip}</title></rect>')
        body.append(f'<line class="mark" x1="{_f(xs(med))}" x2="{_f(xs(med))}" y1="{_f(cy - 9)}" '
                    f'y2="{_f(cy + 9)}" stroke="{INK}" stroke-width="2"/>')
        dots = vs if len(vs) <= MAX_DOTS else [vs[round(i * (len(vs) - 1) / (MAX_DOTS - 1))]
                                               for i in range(MAX_DOTS)]
        for j, v in enumerate(dots):  # a fixed jitter so the file is byte-stable
            jy = cy + ((j * 7) % 11 - 5) * 1.2
            body.append(f'<circle class="mark" cx="{_f(xs(v))}" cy="{_f(jy)}" r="1.8" fill="{color}" '
                        f'fill-opacity="0.55"/>')
        body.append("</g>")
    return _frame(title, WIDTH, height, body, note)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes, for x higher-is-better and y lower-is-better
    (throughput against latency); sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return sorted(front)
