"""What a sweep found, drawn for the offline report (app.runs.report): parallel coordinates of the swept
settings and the metric, parameter importance, the optimisation history, and the best run in words.

    from app.runs import sweepcharts
    trials = sweepcharts.trials_of(runs, value_of)  # completed runs with a value of the metric, in start order
    text = sweepcharts.parallel_svg("title", trials, ["learning_rate"], "val_loss", "minimize", {"learning_rate": True})

Plain SVG text like app.runs.svg (whose axes, colours and escaping it reuses): every user-chosen text is
escaped and cut to a bounded length, and the number of axes is bounded, so a sweep of hundreds of runs
or a hostile config still makes a page of bounded size that a browser opens quickly.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Any

from app import display
from app.sweep.optuna import importance as imp
from app.runs import svg

MAX_AXES = 12  # swept settings drawn as axes (most important first); more would be unreadable
AXIS_GAP = 150  # px between two axes
PC_TOP, PC_H, PC_LEFT = 78, 300, 80  # parallel coordinates: room for title and names, axis height, left room
NAME_CHARS = 22  # an axis name or category label longer than this is cut (the hover text has it whole)
TIP_CHARS = 400  # a hover text is cut here
VALUE_CHARS = 80  # one config value in a hover text or a category label
MAX_CATEGORY_LABELS = 20  # more categories than this on an axis: every k-th is labelled


@dataclass
class Trial:
    run: Any  # runlog.OfflineRun
    value: float  # the sweep's metric
    order: int  # 1-based, in the order the runs started
    number: int | None = None  # its trial number as sweep-status shows it, where known (app.runs.grouping)


def cut(text: str, limit: int = NAME_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def short(v: Any, digits: str = ".4g") -> str:
    """A config value as the charts show it (a float to `digits`), at most VALUE_CHARS long."""
    return cut(display.text(v, digits), VALUE_CHARS)


def started(run) -> tuple:
    """When a run started: its first logged timestamp, then its folder name (offline-run-DATE_TIME-id)."""
    stamps = [r["_timestamp"] for r in run.history[:1] if isinstance(r.get("_timestamp"), (int, float))]
    return (stamps[0] if stamps else float("inf"), run.path.name)


def completed(run) -> bool:
    """Trained to its end: exit code 0 and not stopped early by Hyperband (a pruned run's metric is an
    early epoch's, not comparable with the others'), as the sweep's storage counts COMPLETE trials; nor
    ended by a diverging loss (app.divergence: its metric is an epoch's from before, or NaN; sweep-status
    shows such a trial as DIVERGED, apart from the completed ones)."""
    return run.exit_code == 0 and not run.summary.get("pruned") and not run.summary.get("diverged")


def trials_of(runs: list, value_of) -> list[Trial]:
    """Completed runs with a finite value of the metric, numbered in the order they started."""
    done = [(r, value_of(r)) for r in runs if completed(r)]
    done = sorted([(r, v) for r, v in done if v is not None], key=lambda rv: started(rv[0]))
    return [Trial(r, v, i + 1) for i, (r, v) in enumerate(done)]


def shade(v: float, lo: float, hi: float, goal: str) -> str:
    """Viridis by the metric, yellow = best whichever the goal (as the report's scatter)."""
    t = 0.5 if hi == lo else (v - lo) / (hi - lo)
    return svg.viridis(t if goal == "maximize" else 1 - t)


def tip(trial: Trial, params: list[str], metric: str) -> str:
    shown = " ".join(f"{k}={short(trial.run.config.get(k))}" for k in params)
    which = f"trial {trial.number}" if trial.number is not None else f"#{trial.order}"
    return cut(f"run {trial.run.run_id} ({which}): {metric} {trial.value:.4g}; {shown}", TIP_CHARS)


def _axis(values: list[Any], log: bool, metric: bool = False) -> tuple[svg.Axis, list[float]]:
    """A vertical axis for one setting and each trial's position on it: a range (log where the sweep
    draws log) for numbers drawn from one, evenly spaced choices for a few numbers (a W&B `values`
    list, as importance treats them: 32, 64, 128, 256 squeeze together on a linear range) and for text."""
    numbers = [display.number(v) for v in values]
    if values and all(x is not None for x in numbers) and (metric or log or len(set(numbers)) > imp.FEW_VALUES):
        log = log and min(numbers) > 0
        return svg.Axis.fit(numbers, log=log), numbers
    cats = sorted({short(v) for v in values}, key=_category_order)
    pos = [float(cats.index(short(v))) for v in values]
    return svg.Axis(-0.5, len(cats) - 0.5, categories=cats), pos


def _category_order(label: str) -> tuple:
    """Numbers first, by value; then text, alphabetically."""
    try:
        value = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, value, label) if math.isfinite(value) else (1, 0.0, label)


def parallel_svg(title: str, trials: list[Trial], params: list[str], metric: str, goal: str,
                 log: dict[str, bool]) -> str | None:
    """One line per completed trial through an axis per swept setting and the metric; None: nothing to draw."""
    if not trials or not params:
        return None
    shown_params = params[:MAX_AXES]
    columns = [(k, [t.run.config.get(k) for t in trials], bool(log.get(k))) for k in shown_params]
    columns.append((metric, [t.value for t in trials], False))
    axes = [(name, *_axis(values, is_log, metric=j == len(columns) - 1)) for j, (name, values, is_log) in enumerate(columns)]
    values = [t.value for t in trials]
    lo, hi = min(values), max(values)
    best = imp.best_of(trials, goal, lambda t: t.value)
    gap = max(AXIS_GAP, min(260, 640 // (len(axes) - 1)))  # few axes: spread out, so the lines' slopes read
    footnote = (f"One line per completed run, coloured by {cut(metric, 40)} (yellow = best); the best run in red. "
                "Hover a line for its run.")
    width = max(PC_LEFT + gap * (len(axes) - 1) + 170, _text_width(title, svg.FONT + 3), _text_width(footnote, svg.FONT))
    height = PC_TOP + PC_H + 60
    out = [_head(width, height, title)]

    def y_of(axis: svg.Axis, v: float) -> float:
        return PC_TOP + (1 - axis.frac(v)) * PC_H

    # lines first (worst first, the best last: on top), then axes over them so ticks stay readable
    order = sorted(range(len(trials)), key=lambda i: (trials[i] is best, values[i] if goal == "maximize" else -values[i]))
    out.append('<g class="trials">')
    for i in order:
        t = trials[i]
        pts = " ".join(f"{svg.num(PC_LEFT + j * gap)},{svg.num(y_of(axis, pos[i]))}"
                       for j, (_, axis, pos) in enumerate(axes))
        style = ('stroke="red" stroke-width="3.5"' if t is best else
                 f'stroke="{shade(t.value, lo, hi, goal)}" stroke-width="1.3" stroke-opacity="0.75"')
        cls = "trial best-trial" if t is best else "trial"
        out.append(f'<polyline class="{cls}" data-run="{svg.esc(t.run.run_id)}" points="{pts}" fill="none" {style}>'
                   f'<title>{svg.esc(tip(t, params, metric))}</title></polyline>')
    out.append("</g>")
    for j, (name, axis, _) in enumerate(axes):
        x = PC_LEFT + j * gap
        is_metric = j == len(axes) - 1
        label = f"{name} ({goal})" if is_metric else name + (" (log)" if axis.log else "")
        out.append(f'<g class="axis" data-name="{svg.esc(name)}"><title>{svg.esc(label)}</title>'
                   f'<line x1="{x}" y1="{PC_TOP}" x2="{x}" y2="{PC_TOP + PC_H}" stroke="#333" stroke-width="1.2"/>'
                   f'<text class="axis-name" x="{x}" y="{PC_TOP - 30}" text-anchor="middle" font-weight="bold">'
                   f'{svg.esc(cut(name))}</text>'
                   f'<text class="axis-note" x="{x}" y="{PC_TOP - 15}" text-anchor="middle" fill="#555">'
                   f'{svg.esc(_axis_note(axis) if not is_metric else "metric, " + goal)}</text>')
        ticks = axis.ticks()
        step = max(1, -(-len(ticks) // MAX_CATEGORY_LABELS))
        for v, text in ticks[::step]:
            y = svg.num(y_of(axis, v))
            out.append(f'<line x1="{x - 4}" y1="{y}" x2="{x}" y2="{y}" stroke="#333"/>'
                       f'<text class="tick" x="{x - 7}" y="{y}" text-anchor="end" dominant-baseline="middle" '
                       f'paint-order="stroke" stroke="white" stroke-width="3">{svg.esc(cut(text))}</text>')
        out.append("</g>")
    if len(params) > MAX_AXES:
        out.append(f'<text x="10" y="{PC_TOP + PC_H + 40}" fill="#555">{len(params) - MAX_AXES} more setting(s) '
                   f'not drawn (the {MAX_AXES} most important are)</text>')
    out.append(_colour_bar(PC_LEFT + gap * (len(axes) - 1) + 60, PC_TOP, metric, lo, hi, goal))
    out.append(f'<text x="10" y="{PC_TOP + PC_H + 24}" fill="#555">{svg.esc(footnote)}</text>')
    out.append("</svg>\n")
    return "\n".join(out)


def _text_width(text: str, size: float) -> float:
    return 20 + 0.6 * size * len(text)  # no font metrics in plain SVG: 0.6 em per character, as app.runs.svg


def _axis_note(axis: svg.Axis) -> str:
    return "choices" if axis.categories is not None else "log scale" if axis.log else "range"


def _head(width: float, height: float, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{svg.num(width)}" height="{svg.num(height)}" '
            f'viewBox="0 0 {svg.num(width)} {svg.num(height)}" font-family="system-ui, sans-serif" font-size="{svg.FONT}">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n'
            f'<text class="suptitle" x="10" y="22" font-size="{svg.FONT + 3}" font-weight="bold">{svg.esc(title)}</text>')


def _colour_bar(left: float, top: float, metric: str, lo: float, hi: float, goal: str) -> str:
    out = [f'<g class="colour-bar" transform="translate({svg.num(left)} {svg.num(top)})">']
    for i in range(20):
        v = lo + (hi - lo) * (i + 0.5) / 20
        band = (19 - i) * 10 if goal == "maximize" else i * 10
        out.append(f'<rect x="0" y="{band}" width="14" height="10" fill="{shade(v, lo, hi, goal)}"/>')
    top_v, bottom_v = (hi, lo) if goal == "maximize" else (lo, hi)
    out.append(f'<text x="20" y="9">{top_v:.4g} best</text><text x="20" y="200">{bottom_v:.4g}</text>'
               f'<line x1="0" y1="225" x2="22" y2="225" stroke="red" stroke-width="3.5"/>'
               f'<text x="28" y="229">best run</text></g>')
    return "".join(out)


ROW_H = 26
NAME_W, BAR_W = 170, 220


def importance_svg(title: str, result: imp.Importance, metric: str) -> str:
    """Per setting: its importance (share of the total, with its 95 % interval as a whisker; a pale bar and
    "rough" where its rank may change) and its rank correlation with the metric, as bars; a setting with no
    figure shows the reason in words. The method, and why the ranking is rough, are named under the bars."""
    settings = result.settings[:MAX_AXES * 2]
    more = len(result.settings) - len(settings)
    imp_x = NAME_W + 10
    cor_x = imp_x + BAR_W + 130  # the correlation bar's left end (-1); its zero is in the middle
    width = max(cor_x + BAR_W + 80, _text_width(title, svg.FONT + 3))
    notes = (([f"No importance yet: {result.note}."] if result.note else []) +
             ([f"{more} more setting(s) not shown: the least important."] if more > 0 else []) +
             textwrap.wrap(result.method, 115) +
             (textwrap.wrap(f"A rough ranking: {result.rough}.", 115) if result.rough else []))
    top = 66
    height = top + ROW_H * max(1, len(settings)) + 22 + 16 * len(notes)
    out = [_head(width, height, title),
           f'<text class="col" x="{imp_x}" y="{top - 12}" font-weight="bold">importance (share of total, 95 % interval)</text>',
           f'<text class="col" x="{cor_x}" y="{top - 12}" font-weight="bold">'
           f'{svg.esc(cut("correlation with " + metric, 40))} (Spearman)</text>']
    mid = cor_x + BAR_W / 2
    out.append(f'<line x1="{mid}" y1="{top - 4}" x2="{mid}" y2="{top + ROW_H * len(settings)}" stroke="#999"/>')
    for i, s in enumerate(settings):
        y = top + i * ROW_H
        between = f" (95 % interval {imp.interval(s)}{', rough' if s.rough else ''})" if imp.interval(s) else ""
        hover = (f"{s.name}: importance {'-' if s.importance is None else f'{s.importance:.1%}'}{between}, correlation "
                 f"{'-' if s.correlation is None else f'{s.correlation:+.2f}'}" + (f" ({s.note})" if s.note else ""))
        row = [f'<g class="setting" data-name="{svg.esc(s.name)}"><title>{svg.esc(cut(hover, TIP_CHARS))}</title>',
               f'<text x="{NAME_W}" y="{y + 16}" text-anchor="end">{svg.esc(cut(s.name))}</text>']
        if s.importance is not None:
            w = BAR_W * s.importance
            pale = ' fill-opacity="0.45"' if s.rough else ""
            row.append(f'<rect class="importance" x="{imp_x}" y="{y + 5}" width="{svg.num(w)}" height="15" '
                       f'fill="#1f77b4"{pale}/>')
            label, right = imp.percent(s.importance), imp_x + w
            if s.low is not None and s.high is not None:  # the 95 % interval: a whisker across the bar
                lo, hi = imp_x + BAR_W * s.low, imp_x + BAR_W * s.high
                row.append(f'<path class="interval" d="M{svg.num(lo)} {y + 9}v7M{svg.num(lo)} {y + 12.5}H{svg.num(hi)}'
                           f'M{svg.num(hi)} {y + 9}v7" stroke="#222" stroke-width="1.2" fill="none"/>')
                label, right = f"{label} ({imp.interval(s)}){' rough' if s.rough else ''}", max(right, hi)
            row.append(f'<text x="{svg.num(right + 4)}" y="{y + 16}">{svg.esc(label)}</text>')
        if s.correlation is not None:
            w = BAR_W / 2 * abs(s.correlation)
            x = mid if s.correlation >= 0 else mid - w
            color = "#2ca02c" if s.correlation >= 0 else "#d62728"
            row.append(f'<rect class="correlation" x="{svg.num(x)}" y="{y + 5}" width="{svg.num(w)}" height="15" fill="{color}"/>'
                       f'<text x="{svg.num(cor_x + BAR_W + 6)}" y="{y + 16}">{s.correlation:+.2f}</text>')
        words = []  # (x, text) where a figure is missing
        if not s.varied:
            words.append((imp_x, s.note))
        else:
            if s.importance is None:
                words.append((imp_x, f"needs {imp.MIN_TRIALS}+ completed trials" if result.note else s.note or "-"))
            if s.correlation is None:
                words.append((cor_x, s.note or "-"))
        for x, text in words:
            row.append(f'<text class="note" x="{x}" y="{y + 16}" fill="#666" font-style="italic">'
                       f'{svg.esc(cut(text, 60))}</text>')
        row.append("</g>")
        out.append("".join(row))
    y = top + ROW_H * max(1, len(settings)) + 18
    for line in notes:
        out.append(f'<text class="method" x="10" y="{y}" fill="#444">{svg.esc(line)}</text>')
        y += 16
    out.append("</svg>\n")
    return "\n".join(out)


def history_svg(title: str, trials: list[Trial], params: list[str], metric: str, goal: str) -> str | None:
    """The metric of each completed run in the order they started, with the best so far as a step line."""
    if not trials:
        return None
    better = (lambda a, b: a > b) if goal == "maximize" else (lambda a, b: a < b)
    steps, best = [], None
    for t in trials:
        if best is None or better(t.value, best):
            if best is not None:
                steps.append((float(t.order), best))  # hold the old best up to here, then step
            best = t.value
        steps.append((float(t.order), best))
    lo, hi = min(t.value for t in trials), max(t.value for t in trials)
    points = svg.Series([(float(t.order), t.value) for t in trials], [shade(t.value, lo, hi, goal) for t in trials],
                        line=False, marker=4.0 if len(trials) <= 100 else 2.5, tips=[tip(t, params, metric) for t in trials])
    so_far = svg.Series(steps, "#d62728", label=f"best {metric} so far", run_id="")
    top = imp.best_of(trials, goal, lambda t: t.value)
    panel = svg.Panel(f"{metric} by run, best so far in red", "run (in the order they started)", metric,
                      svg.Axis.fit([float(t.order) for t in trials], integer=True), svg.Axis.fit([t.value for t in trials]),
                      [so_far, points], [(float(top.order), top.value)])
    side = ['<text class="legend-title" x="0" y="0" font-weight="bold">history</text>',
            '<line x1="0" y1="16" x2="22" y2="16" stroke="#d62728" stroke-width="2"/>'
            f'<text x="28" y="20">best so far ({svg.esc(goal)})</text>',
            '<circle cx="11" cy="36" r="4" fill="#5ec962" stroke="#222" stroke-width="0.5"/><text x="28" y="40">one run</text>',
            '<circle cx="11" cy="56" r="9" fill="none" stroke="red" stroke-width="1.5"/><text x="28" y="60">the best run</text>']
    return svg.figure(title, [panel], side, 180, 70)
