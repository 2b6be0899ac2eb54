"""Small inline-SVG charts for the HTML report: a line chart (loss curves with marker lines) and a grouped
bar chart. Plain strings, no dependencies and no network, so the report is one self-contained file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str = PALETTE[0]
    markers: bool = False
    css: str = "series"


@dataclass
class Marker:
    """A horizontal (`y`) or vertical (`x`) reference line with a label."""

    label: str
    x: float | None = None
    y: float | None = None
    color: str = "#555"
    css: str = "marker"
    dash: str = "6 4"
    extra: dict[str, str] = field(default_factory=dict)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def line_chart(
    series: Sequence[Series], markers: Sequence[Marker] = (), *, title: str = "", xlabel: str = "", ylabel: str = "",
    width: int = 800, height: int = 360, css_id: str = "chart",
) -> str:
    pts = [p for s in series for p in s.points if math.isfinite(p[1])]
    if not pts:
        return f'<p class="empty">{escape(title)}: no data</p>'
    xs = [p[0] for p in pts] + [m.x for m in markers if m.x is not None]
    ys = [p[1] for p in pts] + [m.y for m in markers if m.y is not None]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 60, 250, 30, 45
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="{escape(css_id)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
    ]
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" font-size="11" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" font-size="12" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(
        f'<text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">'
        f"{escape(ylabel)}</text>"
    )
    legend: list[tuple[str, str, str]] = []
    for m in markers:
        if m.y is not None:
            out.append(f'<line class="{m.css}" x1="{left}" x2="{left + pw}" y1="{sy(m.y):.1f}" y2="{sy(m.y):.1f}" '
                       f'stroke="{m.color}" stroke-dasharray="{m.dash}" stroke-width="1.5"/>')
        if m.x is not None:
            out.append(f'<line class="{m.css}" x1="{sx(m.x):.1f}" x2="{sx(m.x):.1f}" y1="{top}" y2="{top + ph}" '
                       f'stroke="{m.color}" stroke-dasharray="{m.dash}" stroke-width="1.5"/>')
        legend.append((m.label, m.color, m.dash))
    for s in series:
        good = [(x, y) for x, y in s.points if math.isfinite(y)]
        if not good:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        out.append(f'<polyline class="{s.css}" fill="none" stroke="{s.color}" stroke-width="1.8" points="{path}"/>')
        if s.markers:
            for x, y in good:
                out.append(f'<circle class="{s.css}-pt" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.color}"/>')
        legend.append((s.name, s.color, ""))
    for i, (label, color, dash) in enumerate(legend):
        ly = top + 10 + i * 18
        lx = left + pw + 12
        out.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/>')
        out.append(f'<text x="{lx + 28}" y="{ly + 4}" font-size="11">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(
    groups: Sequence[str], names: Sequence[str], values: Sequence[Sequence[float | None]], *, title: str = "",
    width: int = 720, height: int = 300, ymax: float = 1.0, css_id: str = "bars",
) -> str:
    """values[i][j] = value of series names[j] in group groups[i] (None = not applicable)."""
    if not groups:
        return f'<p class="empty">{escape(title)}: no data</p>'
    left, right, top, bottom = 50, 150, 30, 50
    pw, ph = width - left - right, height - top - bottom
    gw = pw / len(groups)
    bw = gw * 0.8 / max(len(names), 1)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="{escape(css_id)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#999"/>',
    ]
    for t in _ticks(0, ymax, 4):
        y = top + ph - t / ymax * ph
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{_fmt(t)}</text>')
    for i, g in enumerate(groups):
        gx = left + i * gw + gw * 0.1
        for j, _ in enumerate(names):
            v = values[i][j]
            if v is None or not math.isfinite(v):
                continue
            h = max(0.0, min(v, ymax)) / ymax * ph
            out.append(f'<rect class="bar" x="{gx + j * bw:.1f}" y="{top + ph - h:.1f}" width="{bw * 0.92:.1f}" '
                       f'height="{h:.1f}" fill="{PALETTE[j % len(PALETTE)]}"><title>{escape(names[j])}: {v:.3f}</title></rect>')
        out.append(f'<text x="{left + i * gw + gw / 2:.1f}" y="{top + ph + 16}" font-size="11" '
                   f'text-anchor="middle">{escape(g)}</text>')
    for j, n in enumerate(names):
        ly = top + 10 + j * 18
        out.append(f'<rect x="{left + pw + 12}" y="{ly - 6}" width="14" height="12" fill="{PALETTE[j % len(PALETTE)]}"/>')
        out.append(f'<text x="{left + pw + 32}" y="{ly + 4}" font-size="11">{escape(n)}</text>')
    out.append("</svg>")
    return "\n".join(out)
