"""A report of offline runs with no server: `python -m app report [PATH] --out DIR`.

Reads every offline run under PATH (default: $WANDB_DIR, else .) straight from its `.wandb` log and
writes, per group of runs (an offline sweep's trials share its name as their group):
  <group>-curves.svg   training loss and the per-epoch val_loss / val_accuracy of every run
  <group>-params.svg   each swept setting against the sweep's metric (one point per finished run)
and index.html, which shows the same charts inline (hover a line or point for its run) with a table of
the runs sorted by the metric. When the sweep's journal ($WANDB_DIR/sweeps/<group>.journal) came along
with the runs, its metric and goal are used, and attempts that died are listed too.

The charts are plain SVG written here: a plotting library would add ~70 MB to the image for six kinds
of shape. Every text in them (run ids, config values, group names) is escaped: users choose those.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import runlog, tracking
from app.errors import UserError

DEFAULT_METRIC, DEFAULT_GOAL = "val_accuracy", "maximize"
NOT_PARAMS = {"data_dir", "output_dir", "device"}  # differ between hosts, not between trials


@dataclass
class Group:
    name: str
    runs: list  # runlog.OfflineRun, sorted by the metric
    metric: str
    goal: str
    params: list[str]  # config keys whose values differ between the runs
    died: list[dict]  # attempts the sweep storage saw die, if it is here


def _number(v: Any) -> float | None:
    """v as a finite float; None for NaN/inf (a diverged run), bools, strings and missing values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _value(run, metric: str) -> float | None:
    v = run.summary.get(metric)
    if v is None:
        rows = run.metric(metric)
        v = rows[-1][1] if rows else None
    return _number(v)


def _sweep_info(root: Path, group: str) -> tuple[str, str, list[dict]]:
    # PATH may be the runs folder (WANDB_DIR) or its wandb/ folder; the journal sits beside wandb/
    journal = next((d / "sweeps" / f"{group}.journal" for d in (root, root.parent)
                    if (d / "sweeps" / f"{group}.journal").is_file()), None)
    if not group or journal is None:
        return DEFAULT_METRIC, DEFAULT_GOAL, []
    import optuna

    from app.sweep import offline as offline_sweep

    try:
        study = optuna.load_study(study_name=group, storage=offline_sweep.open_storage(str(journal)))
    except (KeyError, ValueError, UserError):
        return DEFAULT_METRIC, DEFAULT_GOAL, []
    died = [r for r in offline_sweep.trial_rows(study) if r["state"] in ("DIED", "STOPPED", "FAIL")]
    return study.user_attrs.get("metric", DEFAULT_METRIC), study.user_attrs.get("goal", DEFAULT_GOAL), died


def collect(root: Path) -> tuple[list[Group], list[str]]:
    runs, problems = [], []
    for folder in runlog.find(root):
        try:
            run = runlog.read(folder)
        except (runlog.RunLogError, OSError) as exc:
            problems.append(f"{folder}: {exc}")
            continue
        if not run.run_id:
            problems.append(f"{folder}: empty log (killed before W&B wrote anything)")
            continue
        runs.append(run)
    groups = []
    for name in sorted({r.group for r in runs}):
        members = [r for r in runs if r.group == name]
        metric, goal, died = _sweep_info(root, name)
        groups.append(make_group(name, members, metric, goal, died))
    return groups, problems


def make_group(name: str, runs: list, metric: str = DEFAULT_METRIC, goal: str = DEFAULT_GOAL,
               died: list[dict] | None = None) -> Group:
    """Runs of one group, best first, with the settings that vary between them."""
    keys = sorted({k for r in runs for k in r.config} - NOT_PARAMS)
    params = [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]
    sign = -1 if goal == "maximize" else 1
    runs = sorted(runs, key=lambda r: (_value(r, metric) is None, sign * (_value(r, metric) or 0.0)))
    return Group(name or "ungrouped", runs, metric, goal, params, died or [])


def _label(run, params: list[str]) -> str:
    shown = " ".join(f"{k}={_short(run.config.get(k))}" for k in params)
    return f"{run.run_id} {shown}".strip()


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "runs"


# ---- SVG charts: axes with ticks, lines, points, a legend and a colour bar; nothing more is needed ----

TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf")
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))  # anchors, low to high
FONT = 12  # px; text widths below are estimated at 0.6 em per character (no font metrics in a plain SVG)
PANEL_W, PANEL_H = 380, 250  # plotting area of one panel
PAD_L, PAD_R, PAD_T, PAD_B = 62, 16, 28, 44  # room for y ticks, title and x ticks + label around it
LEGEND_CHARS = 60  # longer run labels are cut in the legend (the full label is the hover text)


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)  # valid in both XML (.svg files) and HTML (inline)


def _num(v: float) -> str:
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


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    x: Axis
    y: Axis
    series: list[Series]
    rings: list[tuple[float, float]] = field(default_factory=list)  # the best point(s), circled in red


def _panel_svg(p: Panel, left: float, top: float) -> str:
    """One panel; (left, top) is its plotting area's corner."""
    def px(x: float) -> float:
        return left + p.x.frac(x) * PANEL_W

    def py(y: float) -> float:
        return top + (1 - p.y.frac(y)) * PANEL_H

    out = [f'<g class="panel" data-title="{_esc(p.title)}">',
           (f'<text class="title" x="{_num(left + PANEL_W / 2)}" y="{_num(top - 10)}" text-anchor="middle" '
            f'font-weight="bold">{_esc(p.title)}</text>'),
           f'<rect x="{left}" y="{top}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/>']
    bottom = top + PANEL_H
    for v, text in p.x.ticks():
        x = _num(px(v))
        out.append(f'<line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="#e6e6e6"/>'
                   f'<text class="xtick" x="{x}" y="{_num(bottom + 16)}" text-anchor="middle">{_esc(text)}</text>')
    for v, text in p.y.ticks():
        y = _num(py(v))
        out.append(f'<line x1="{left}" y1="{y}" x2="{left + PANEL_W}" y2="{y}" stroke="#e6e6e6"/>'
                   f'<text class="ytick" x="{_num(left - 6)}" y="{y}" text-anchor="end" '
                   f'dominant-baseline="middle">{_esc(text)}</text>')
    out.append(f'<text class="xlabel" x="{_num(left + PANEL_W / 2)}" y="{_num(bottom + 36)}" '
               f'text-anchor="middle">{_esc(p.xlabel + (" (log)" if p.x.log else ""))}</text>')
    ly = _num(top + PANEL_H / 2)
    out.append(f'<text class="ylabel" x="{_num(left - 48)}" y="{ly}" text-anchor="middle" '
               f'transform="rotate(-90 {_num(left - 48)} {ly})">{_esc(p.ylabel + (" (log)" if p.y.log else ""))}</text>')
    for s in p.series:
        run = f' data-run="{_esc(s.run_id)}"' if s.run_id else ""
        if s.line and s.points:
            points = " ".join(f"{_num(px(x))},{_num(py(y))}" for x, y in s.points)
            dash = ' stroke-dasharray="3 3"' if s.dashed else ""
            tip = f"<title>{_esc(s.label)}</title>" if s.label else ""
            out.append(f'<polyline class="line"{run} points="{points}" fill="none" stroke="{s.color}" '
                       f'stroke-width="1.6"{dash}>{tip}</polyline>')
        if s.marker:
            for i, (x, y) in enumerate(s.points):
                color = s.color[i] if isinstance(s.color, list) else s.color
                tip = f"<title>{_esc(s.tips[i])}</title>" if i < len(s.tips) else ""
                out.append(f'<circle class="point"{run} cx="{_num(px(x))}" cy="{_num(py(y))}" r="{s.marker}" '
                           f'fill="{color}" stroke="#222" stroke-width="0.5">{tip}</circle>')
    for x, y in p.rings:
        out.append(f'<circle class="best" cx="{_num(px(x))}" cy="{_num(py(y))}" r="11" fill="none" '
                   f'stroke="red" stroke-width="1.5"/>')
    out.append("</g>")
    return "\n".join(out)


def _figure(title: str, panels: list[Panel], side: list[str], side_width: float, side_height: float) -> str:
    """Panels in a row under a title; `side` is SVG drawn to their right (legend, colour bar)."""
    cell_w = PAD_L + PANEL_W + PAD_R
    width = cell_w * len(panels) + side_width + 10
    height = max(30 + PAD_T + PANEL_H + PAD_B, 30 + PAD_T + side_height + 10)
    body = [_panel_svg(p, i * cell_w + PAD_L, 30 + PAD_T) for i, p in enumerate(panels)]
    side_left = cell_w * len(panels)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{_num(width)}" height="{_num(height)}" '
            f'viewBox="0 0 {_num(width)} {_num(height)}" font-family="system-ui, sans-serif" font-size="{FONT}">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n'
            f'<text class="suptitle" x="{_num(width / 2)}" y="20" text-anchor="middle" font-size="{FONT + 3}" '
            f'font-weight="bold">{_esc(title)}</text>\n'
            + "\n".join(body)
            + f'\n<g class="side" transform="translate({side_left} {30 + PAD_T})">\n' + "\n".join(side) + "\n</g>\n</svg>\n")


def _points(rows: list[tuple[Any, Any]], log_y: bool = False) -> list[tuple[float, float]]:
    # NaN/inf (a diverged run) and non-numbers are left out: the line skips them rather than breaking the chart
    out = []
    for x, y in rows:
        x, y = _number(x), _number(y)
        if x is not None and y is not None and (y > 0 or not log_y):
            out.append((x, y))
    return out


CURVES = (("loss", "training loss", "examples seen", "loss"), ("val_loss", "val_loss", "epoch", "loss"),
          ("val_accuracy", "val_accuracy", "epoch", "accuracy"))


def curves_svg(group: Group) -> str:
    """Training loss, val_loss and val_accuracy of every run in the group; one colour per run."""
    n = len(group.runs)
    colors = [TAB10[i % 10] if n <= 10 else viridis(i / max(1, n - 1)) for i in range(n)]
    panels = []
    for key, title, xlabel, ylabel in CURVES:
        series = []
        for run, color in zip(group.runs, colors):
            if key == "loss":
                rows = run.metric(key)
            else:
                rows = [(row.get("epoch", j) + 1, row[key]) for j, row in enumerate(r for r in run.history if key in r)]
            points = _points(rows)
            if points:
                label = _label(run, group.params)
                series.append(Series(points, color, label=label, dashed=not run.finished,
                                     marker=0.0 if key == "loss" else 2.5, run_id=run.run_id,
                                     tips=[f"{label}: {ylabel} {y:.4g} at {xlabel} {tick_label(x)}" for x, y in points]))
        xs = [x for s in series for x, _ in s.points]
        ys = [y for s in series for _, y in s.points]
        panels.append(Panel(title, xlabel, ylabel, Axis.fit(xs, integer=xlabel == "epoch"), Axis.fit(ys), series))
    legend = ['<text class="legend-title" x="0" y="0" font-weight="bold">run</text>']
    for i, (run, color) in enumerate(zip(group.runs, colors)):
        label = _label(run, group.params)
        shown = label if len(label) <= LEGEND_CHARS else label[:LEGEND_CHARS - 1] + "…"
        dash = ' stroke-dasharray="3 3"' if not run.finished else ""
        y = 18 + 16 * i
        legend.append(f'<g class="legend-entry" data-run="{_esc(run.run_id)}"><title>{_esc(label)}</title>'
                      f'<line x1="0" y1="{y - 4}" x2="22" y2="{y - 4}" stroke="{color}" stroke-width="2"{dash}/>'
                      f'<text x="28" y="{y}">{_esc(shown)}</text></g>')
    if any(not r.finished for r in group.runs):
        legend.append(f'<text x="0" y="{18 + 16 * n + 6}" fill="#555">dotted: never finished</text>')
    width = 40 + 0.6 * FONT * max([len(_label(r, group.params)[:LEGEND_CHARS]) for r in group.runs] + [22])
    return _figure(f"{group.name}: {n} run(s)", panels, legend, width, 18 + 16 * (n + 1))


def params_svg(group: Group) -> str | None:
    """Each swept setting against the sweep's metric, one point per finished run; None: nothing to plot."""
    points = [(r, _value(r, group.metric)) for r in group.runs]
    points = [(r, v) for r, v in points if v is not None and r.finished]
    if not group.params or not points:
        return None
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    best = (max if group.goal == "maximize" else min)(values)

    def shade(v: float) -> str:  # yellow = best, whichever the goal
        t = 0.5 if hi == lo else (v - lo) / (hi - lo)
        return viridis(t if group.goal == "maximize" else 1 - t)

    panels = []
    for key in group.params:
        xs = [r.config.get(key) for r, _ in points]
        if all(_number(x) is not None for x in xs):
            log = min(xs) > 0 and max(xs) / min(xs) >= 10
            pos, x_axis = [float(x) for x in xs], Axis.fit([float(x) for x in xs], log=log)
        else:
            cats = sorted({_short(x) for x in xs})
            pos = [float(cats.index(_short(x))) for x in xs]
            x_axis = Axis(-0.5, len(cats) - 0.5, categories=cats)
        tips = [f"{r.run_id}: {key}={_short(x)} {group.metric} {v:.4f}" for (r, v), x in zip(points, xs)]
        series = Series(list(zip(pos, values)), [shade(v) for v in values], line=False, marker=5.0, tips=tips)
        rings = [(x, v) for x, v in zip(pos, values) if v == best]
        panels.append(Panel(key, key, group.metric, x_axis, Axis.fit(values), [series], rings))
    # the colour bar: 20 bands from worst (bottom) to best (top), with the metric's range
    bar = [f'<text class="legend-title" x="0" y="0" font-weight="bold">{_esc(group.metric)}</text>']
    for i in range(20):
        v = lo + (hi - lo) * (i + 0.5) / 20
        band_top = 10 + (19 - i) * 10 if group.goal == "maximize" else 10 + i * 10
        bar.append(f'<rect x="0" y="{band_top}" width="16" height="10" fill="{shade(v)}"/>')
    top_v, bottom_v = (hi, lo) if group.goal == "maximize" else (lo, hi)
    bar.append(f'<text class="bar-label" x="22" y="20">{top_v:.4g} (best)</text>'
               f'<text class="bar-label" x="22" y="210">{bottom_v:.4g}</text>')
    title = f"{group.name}: {group.metric} ({group.goal}) by setting; red ring = best"
    return _figure(title, panels, bar, 40 + 0.6 * FONT * max(len(group.metric), 14), 220)


def _table(group: Group) -> str:
    head = ["run", "state", *group.params, group.metric, "epochs", "test_accuracy", "folder"]
    rows = []
    for r in group.runs:
        epochs = len([row for row in r.history if "val_loss" in row])
        state = "finished" if r.finished and r.exit_code == 0 else ("pruned" if r.summary.get("pruned") else
                                                                     "killed" if not r.finished else f"exit {r.exit_code}")
        cells = [r.run_id, state, *[_short(r.config.get(k)) for k in group.params],
                 _fmt(_value(r, group.metric)), str(epochs), _fmt(r.summary.get("test_accuracy")), r.path.name]
        rows.append(cells)
    for d in group.died:
        if not any(d["run"] == r.run_id for r in group.runs):
            rows.append([d["run"] or "-", d["state"].lower(), *["" for _ in group.params], "", "", "", "(no run folder)"])
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) +
            f"</tr></thead><tbody>\n{body}\n</tbody></table>")


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1500px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f0}tr:nth-child(2){background:#eaffea}svg.chart{max-width:100%;height:auto;border:1px solid #ddd;margin:.5em 0}"""


def page(root: Path, groups: list[Group], problems: list[str]) -> tuple[str, dict[str, str]]:
    """index.html and the charts it shows, as {file name: SVG}."""
    charts: dict[str, str] = {}
    parts = [f"<h1>Offline runs in {html.escape(str(root))}</h1>"]
    for g in groups:
        slug = _slug(g.name)
        best = next((r for r in g.runs if _value(r, g.metric) is not None), None)
        parts.append(f"<h2>{html.escape(g.name)}</h2>")
        if best is not None:
            parts.append(f"<p>best: run <b>{html.escape(best.run_id)}</b> {html.escape(g.metric)} "
                         f"{_value(best, g.metric):.4f} ({html.escape(_label(best, g.params))}); "
                         f"goal: {html.escape(g.goal)} {html.escape(g.metric)}</p>")
        parts.append(_table(g))
        params = params_svg(g)
        if params is not None:
            charts[f"{slug}-params.svg"] = params
            parts.append(params)
        charts[f"{slug}-curves.svg"] = curves_svg(g)
        parts.append(charts[f"{slug}-curves.svg"])
    if problems:
        parts.append("<h2>Runs left out</h2><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    index = (f"<!doctype html><html><head><meta charset='utf-8'><title>Offline runs</title>"
             f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    return index, charts


def render(root: Path, out: Path) -> Path:
    groups, problems = collect(root)
    if not groups:
        raise UserError(f"no offline runs under {root}: pass the folder that holds wandb/offline-run-* (or WANDB_DIR)")
    index, charts = page(root, groups, problems)
    out.mkdir(parents=True, exist_ok=True)
    for name, svg in charts.items():
        (out / name).write_text(svg, encoding="utf-8")
    (out / "index.html").write_text(index, encoding="utf-8")
    return out / "index.html"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app report",
                                     description="Render offline runs (and offline sweeps) to SVG charts and a static HTML page.")
    parser.add_argument("path", nargs="?", help="runs folder (default: $WANDB_DIR, else .)")
    parser.add_argument("--out", default="report", help="folder for index.html and the SVG charts (default: report)")
    args = parser.parse_args(argv)
    root = Path(args.path) if args.path else tracking.runs_root(os.environ)
    if not root.exists():
        raise UserError(f"runs folder {str(root)!r} does not exist")
    index = render(root, Path(args.out))
    print(f"report written: {index}")
    return 0
