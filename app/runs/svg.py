"""A small SVG chart kit for the offline report (app.runs.report): axes with ticks, lines, points, a
legend and a colour bar, written as plain SVG text.

    from app.runs import svg
    panel = svg.Panel("val_loss", "epoch", "loss", svg.Axis.fit([1, 2, 3], integer=True), svg.Axis.fit(ys),
                      [svg.Series([(1, 0.5), (2, 0.4)], svg.TAB10[0], label="run a", marker=2.5)])
    text = svg.figure("title", [panel], side=[], side_width=0, side_height=0)

A plotting library would add ~70 MB to the image for six kinds of shape. Every text drawn (run ids,
config values, group names) is escaped: users choose those.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from app import display


TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf")
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))  # anchors, low to high
FONT = 12  # px; text widths below are estimated at 0.6 em per character (no font metrics in a plain SVG)
PANEL_W, PANEL_H = 380, 250  # plotting area of one panel
PAD_L, PAD_R, PAD_T, PAD_B = 62, 16, 28, 44  # room for y ticks, title and x ticks + label around it
LEGEND_CHARS = 60  # longer run labels are cut in the legend (the full label is the hover text)


def esc(text: Any) -> str:
    # valid in both XML (.svg files) and HTML (inline); invisible controls shown as escapes (display.visible)
    return html.escape(display.visible(str(text)), quote=True)


def num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def viridis(t: float) -> str:
    t = min(1.0, max(0.0, t)) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    return "#" + "".join(f"{round(a + (b - a) * f):02x}" for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def tick_label(v: float) -> str:
    a = abs(v)
    if a >= 1e6:
        return f"{float(f'{v / 1e6:.6g}'):g}M"
    if a >= 1e4:
        return f"{float(f'{v / 1e3:.6g}'):g}k"  # examples seen: 60k, not 60000 or 6e+04
    return "0" if a < 1e-12 else f"{float(f'{v:.6g}'):g}"


@dataclass
class Axis:
    lo: float
    hi: float
    log: bool = False
    integer: bool = False  # epochs
    categories: list[str] | None = None  # a categorical axis: positions 0..n-1 carry these labels

    @classmethod
    def fit(cls, values: list[float], log: bool = False, integer: bool = False) -> Axis:
        """An axis spanning `values` with 5 % room at both ends (in log space for a log axis)."""
        vs = [math.log10(v) for v in values] if log else list(values)
        lo, hi = (min(vs), max(vs)) if vs else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = (lo - 0.5, hi + 0.5) if log or integer or lo == 0 else (lo - abs(lo) * 0.1, hi + abs(hi) * 0.1)
        room = (hi - lo) * 0.05
        lo, hi = lo - room, hi + room
        return cls(10 ** lo, 10 ** hi, log, integer) if log else cls(lo, hi, log, integer)

    def frac(self, v: float) -> float:
        """Where v sits on the axis, 0 (lo) to 1 (hi)."""
        if self.log:
            return (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (v - self.lo) / (self.hi - self.lo)

    def ticks(self) -> list[tuple[float, str]]:
        if self.categories is not None:
            return [(float(i), c) for i, c in enumerate(self.categories)]
        if self.log:
            first, last = math.ceil(math.log10(self.lo) - 1e-9), math.floor(math.log10(self.hi) + 1e-9)
            decades = [10.0 ** k for k in range(first, last + 1)]
            # under two decades, 2x and 5x ticks too, so the axis always has numbers to read
            steps = (1, 2, 5) if len(decades) < 3 else (1,)
            values = sorted(m * 10.0 ** k for k in range(first - 1, last + 1) for m in steps)
            return [(v, tick_label(v)) for v in values if self.lo <= v * (1 + 1e-9) and v <= self.hi * (1 + 1e-9)]
        span = self.hi - self.lo
        magnitude = 10 ** math.floor(math.log10(span / 5))
        step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if span / (m * magnitude) <= 6)
        if self.integer:
            step = max(1.0, round(step))
        first = math.ceil(self.lo / step - 1e-9)
        values = [(first + i) * step for i in range(int((self.hi - first * step) / step + 1e-9) + 1)]
        return [(v, tick_label(v)) for v in values]


@dataclass
class Series:
    points: list[tuple[float, float]]
    color: str | list[str]  # one colour, or one per point (a scatter coloured by the metric)
    label: str = ""  # hover text of a line; "" for none
    line: bool = True
    dashed: bool = False
    marker: float = 0.0  # point radius, 0 = none
    tips: list[str] = field(default_factory=list)  # hover text per point
    run_id: str = ""
    ended: str = ""  # how a run that did not complete ended (pruned, diverged, failed, ...): a cross at its last point
    crosses: bool = False  # points drawn as crosses (runs that did not complete), class "ended"


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    x: Axis
    y: Axis
    series: list[Series]
    rings: list[tuple[float, float]] = field(default_factory=list)  # the best point(s), circled in red


def panel_svg(p: Panel, left: float, top: float) -> str:
    """One panel; (left, top) is its plotting area's corner."""
    def px(x: float) -> float:
        return left + p.x.frac(x) * PANEL_W

    def py(y: float) -> float:
        return top + (1 - p.y.frac(y)) * PANEL_H

    out = [f'<g class="panel" data-title="{esc(p.title)}">',
           (f'<text class="title" x="{num(left + PANEL_W / 2)}" y="{num(top - 10)}" text-anchor="middle" '
            f'font-weight="bold">{esc(p.title)}</text>'),
           f'<rect x="{left}" y="{top}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/>']
    bottom = top + PANEL_H
    for v, text in p.x.ticks():
        x = num(px(v))
        out.append(f'<line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="#e6e6e6"/>'
                   f'<text class="xtick" x="{x}" y="{num(bottom + 16)}" text-anchor="middle">{esc(text)}</text>')
    for v, text in p.y.ticks():
        y = num(py(v))
        out.append(f'<line x1="{left}" y1="{y}" x2="{left + PANEL_W}" y2="{y}" stroke="#e6e6e6"/>'
                   f'<text class="ytick" x="{num(left - 6)}" y="{y}" text-anchor="end" '
                   f'dominant-baseline="middle">{esc(text)}</text>')
    out.append(f'<text class="xlabel" x="{num(left + PANEL_W / 2)}" y="{num(bottom + 36)}" '
               f'text-anchor="middle">{esc(p.xlabel + (" (log)" if p.x.log else ""))}</text>')
    ly = num(top + PANEL_H / 2)
    out.append(f'<text class="ylabel" x="{num(left - 48)}" y="{ly}" text-anchor="middle" '
               f'transform="rotate(-90 {num(left - 48)} {ly})">{esc(p.ylabel + (" (log)" if p.y.log else ""))}</text>')
    for s in p.series:
        run = f' data-run="{esc(s.run_id)}"' if s.run_id else ""
        if s.line and s.points:
            points = " ".join(f"{num(px(x))},{num(py(y))}" for x, y in s.points)
            dash = ' stroke-dasharray="3 3"' if s.dashed else ""
            tip = f"<title>{esc(s.label)}</title>" if s.label else ""
            out.append(f'<polyline class="line"{run} points="{points}" fill="none" stroke="{s.color}" '
                       f'stroke-width="1.6"{dash}>{tip}</polyline>')
        if s.line and len(s.points) == 1 and not s.marker:  # one logged point (a one-epoch run): no line to draw
            (x, y), tip = s.points[0], f"<title>{esc(s.label)}</title>" if s.label else ""
            out.append(f'<circle class="point"{run} cx="{num(px(x))}" cy="{num(py(y))}" r="2.5" fill="{s.color}">{tip}</circle>')
        if s.marker:
            for i, (x, y) in enumerate(s.points):
                color = s.color[i] if isinstance(s.color, list) else s.color
                tip = f"<title>{esc(s.tips[i])}</title>" if i < len(s.tips) else ""
                if s.crosses:
                    out.append(cross(px(x), py(y), s.marker, color, run, tip))
                else:
                    out.append(f'<circle class="point"{run} cx="{num(px(x))}" cy="{num(py(y))}" r="{s.marker}" '
                               f'fill="{color}" stroke="#222" stroke-width="0.5">{tip}</circle>')
        if s.ended and s.points:
            x, y = s.points[-1]
            out.append(cross(px(x), py(y), 5.0, s.color if isinstance(s.color, str) else "#222", run,
                             f"<title>{esc(f'{s.label}: {s.ended}' if s.label else s.ended)}</title>", s.ended))
    for x, y in p.rings:
        out.append(f'<circle class="best" cx="{num(px(x))}" cy="{num(py(y))}" r="11" fill="none" '
                   f'stroke="red" stroke-width="1.5"/>')
    out.append("</g>")
    return "\n".join(out)


def cross(x: float, y: float, r: float, color: str, run: str = "", tip: str = "", state: str = "") -> str:
    """An "x" of half-width r at (x, y): a run that did not complete (pruned, diverged, failed, killed)."""
    where = f' data-state="{esc(state)}"' if state else ""
    return (f'<path class="ended"{run}{where} d="M{num(x - r)} {num(y - r)}L{num(x + r)} {num(y + r)}M{num(x - r)} '
            f'{num(y + r)}L{num(x + r)} {num(y - r)}" stroke="{color}" stroke-width="2.2" fill="none">{tip}</path>')


def figure(title: str, panels: list[Panel], side: list[str], side_width: float, side_height: float) -> str:
    """Panels in a row under a title; `side` is SVG drawn to their right (legend, colour bar)."""
    cell_w = PAD_L + PANEL_W + PAD_R
    width = cell_w * len(panels) + side_width + 10
    height = max(30 + PAD_T + PANEL_H + PAD_B, 30 + PAD_T + side_height + 10)
    body = [panel_svg(p, i * cell_w + PAD_L, 30 + PAD_T) for i, p in enumerate(panels)]
    side_left = cell_w * len(panels)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{num(width)}" height="{num(height)}" '
            f'viewBox="0 0 {num(width)} {num(height)}" font-family="system-ui, sans-serif" font-size="{FONT}">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n'
            f'<text class="suptitle" x="{num(width / 2)}" y="20" text-anchor="middle" font-size="{FONT + 3}" '
            f'font-weight="bold">{esc(title)}</text>\n'
            + "\n".join(body)
            + f'\n<g class="side" transform="translate({side_left} {30 + PAD_T})">\n' + "\n".join(side) + "\n</g>\n</svg>\n")


def points(rows: list[tuple[Any, Any]], log_y: bool = False) -> list[tuple[float, float]]:
    # NaN/inf (a diverged run) and non-numbers are left out: the line skips them rather than breaking the chart
    out = []
    for x, y in rows:
        x, y = display.number(x), display.number(y)
        if x is not None and y is not None and (y > 0 or not log_y):
            out.append((x, y))
    return out
