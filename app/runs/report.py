"""A report of offline runs with no server: `python -m app report [PATH ...] --out DIR`.

Reads every offline run under the PATHs (default: $WANDB_DIR, else runs; one sweep's runs may be spread
over several, one per host) straight from its `.wandb` log and writes, per group of runs (an offline
sweep's trials share its name as their group, a W&B sweep's runs its sweep id):
  <group>-curves.svg   training loss and the per-epoch val_loss / val_accuracy of every run
  <group>-params.svg   each swept setting against the sweep's metric (one point per finished run)
  <group>-parallel.svg, -importance.svg, -history.svg   what the sweep found (app.runs.sweepcharts)
and index.html, which shows the same charts inline (hover a line or point for its run) with a table of
the runs sorted by the metric (sortable by any column: app.runs.table), each with its trial number and
seconds as sweep-status shows them and its model artifact (name, aliases, size). Runs that were pruned,
diverged or failed end in a cross in the charts. Each sweep's
metric, goal and log-scale settings are read from its storage (--storage or SWEEP_STORAGE: a journal
or PostgreSQL, read-only; else a journal copied along with the runs, app.runs.ranking), and attempts
that died are listed too; where none holds it (a W&B sweep), the page says what was assumed and why.
Above the table: the best run in words with the command that trains it again (without the settings
that pick and tune the device: it says which device the run trained on instead).

An offline artifact has no version number yet: W&B numbers versions (v0, v1, ...) when `sync`
uploads them, so the table shows the aliases the run asked for and the artifact's content digest.
Runs are read and grouped by app.runs.grouping; this module draws the page from the groups. The charts
come from app.runs.svg; every text (run ids, config values, group names) is escaped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app import artifact, display, places, settings
from app.errors import UserError
from app.runs import grouping, svg, sweepcharts, table
from app.runs.grouping import Group
from app.runs.ranking import Sources
from app.sweep.optuna import importance

def _label(run, params: list[str]) -> str:
    shown = " ".join(f"{k}={_short(run.config.get(k))}" for k in params)
    return f"{run.run_id} {shown}".strip()


def _short(v: Any) -> str:
    """A config value in a run's label or cell: cut as the charts cut it, floats to 3 digits (a label
    holds every swept setting)."""
    return sweepcharts.short(v, ".3g")


def _slug(name: str) -> str:
    return places.file_stem(name)  # a group name comes from run logs: bounded, so the file name fits


MAX_SETTINGS = 40  # swept settings ranked and drawn at most (W&B sweeps vary a handful)

CURVES = (("loss", "training loss", "examples seen", "loss"), ("val_loss", "val_loss", "epoch", "loss"),
          ("val_accuracy", "val_accuracy", "epoch", "accuracy"))


CURVES_IN_COLOUR = 10  # runs drawn in colour, each with its own legend entry; more are drawn in grey
GREY = "#c9c9c9"


def curves_svg(group: Group) -> str:
    """Training loss, val_loss and val_accuracy of every run in the group. Up to CURVES_IN_COLOUR runs: one
    colour each. A bigger sweep: the best CURVES_IN_COLOUR in colour over every other run in grey, a line
    each with its run on hover but no points, so hundreds of runs stay readable (and the page small)."""
    n = len(group.runs)
    coloured = group.runs[:CURVES_IN_COLOUR]  # the runs come best first
    grey = group.runs[len(coloured):]
    colors = [svg.TAB10[i % 10] for i in range(len(coloured))]
    panels = []
    for key, title, xlabel, ylabel in CURVES:
        series = []
        # grey first, so the coloured runs are drawn over them
        for run, color in [(r, GREY) for r in grey] + list(zip(coloured, colors)):
            if key == "loss":
                rows = run.metric(key)
            else:
                rows = [(row.get("epoch", j) + 1, row[key]) for j, row in enumerate(r for r in run.history if key in r)]
            points = svg.points(rows)
            if points:
                label = _label(run, group.params)
                marked = color != GREY and key != "loss"
                series.append(svg.Series(points, color, label=label, dashed=not run.finished, ended=_ended(run),
                                         marker=2.5 if marked else 0.0, run_id=run.run_id,
                                         tips=[f"{label}: {ylabel} {y:.4g} at {xlabel} {svg.tick_label(x)}"
                                               for x, y in points] if color != GREY else []))
        xs = [x for s in series for x, _ in s.points]
        ys = [y for s in series for _, y in s.points]
        panels.append(svg.Panel(title, xlabel, ylabel, svg.Axis.fit(xs, integer=xlabel == "epoch"), svg.Axis.fit(ys), series))
    legend = ['<text class="legend-title" x="0" y="0" font-weight="bold">run</text>']
    for i, (run, color) in enumerate(zip(coloured, colors)):
        label = _label(run, group.params) + (f" ({_ended(run)})" if _ended(run) else "")
        shown = label if len(label) <= svg.LEGEND_CHARS else label[:svg.LEGEND_CHARS - 1] + "…"
        dash = ' stroke-dasharray="3 3"' if not run.finished else ""
        y = 18 + 16 * i
        legend.append(f'<g class="legend-entry" data-run="{svg.esc(run.run_id)}"><title>{svg.esc(label)}</title>'
                      f'<line x1="0" y1="{y - 4}" x2="22" y2="{y - 4}" stroke="{color}" stroke-width="2"{dash}/>'
                      f'<text x="28" y="{y}">{svg.esc(shown)}</text></g>')
    rows = len(coloured)
    if grey:
        y = 18 + 16 * rows
        legend.append(f'<g class="legend-rest"><line x1="0" y1="{y - 4}" x2="22" y2="{y - 4}" stroke="{GREY}" '
                      f'stroke-width="2"/><text x="28" y="{y}">the other {len(grey)} runs (table below)</text></g>')
        rows += 1
    if any(not r.finished for r in group.runs):
        legend.append(f'<text x="0" y="{18 + 16 * rows + 6}" fill="#555">dotted: never finished</text>')
        rows += 1
    if any(_ended(r) for r in group.runs):
        legend.append(f'<text class="ended-note" x="0" y="{18 + 16 * rows + 6}" fill="#555">× a line\'s end: '
                      "pruned, diverged or failed (hover it)</text>")
    width = 40 + 0.6 * svg.FONT * max([len(_label(r, group.params)[:svg.LEGEND_CHARS]) for r in coloured] + [30])
    title = f"{group.name}: {n} run(s)" + (f", the best {len(coloured)} in colour" if grey else "")
    return svg.figure(title, panels, legend, width, 18 + 16 * (rows + 1))


def _ended(run) -> str:
    """How a run that finished without completing ended (pruned, diverged, exit N); "" for the others
    (completed, or never finished: a dotted line, it may still be running)."""
    return "" if not run.finished or sweepcharts.completed(run) else grouping.state(run)


def params_svg(group: Group) -> str | None:
    """Each swept setting against the sweep's metric, one point per finished run; None: nothing to plot."""
    points = [(r, grouping.value(r, group.metric)) for r in group.runs]
    points = [(r, v) for r, v in points if v is not None and r.finished]
    ended = [(r, v) for r, v in points if _ended(r)]  # pruned, diverged, failed: marked, never the best
    points = [(r, v) for r, v in points if not _ended(r)]
    if not group.params or not points:
        return None
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    best = (max if group.goal == "maximize" else min)(values)

    def shade(v: float) -> str:  # yellow = best, whichever the goal
        t = 0.5 if hi == lo else (v - lo) / (hi - lo)
        return svg.viridis(t if group.goal == "maximize" else 1 - t)

    panels = []
    for key in group.params:
        xs = [r.config.get(key) for r, _ in points + ended]  # the axis spans the ended runs' values too
        if all(display.number(x) is not None for x in xs):
            log = min(xs) > 0 and max(xs) / min(xs) >= 10
            pos, x_axis = [float(x) for x in xs], svg.Axis.fit([float(x) for x in xs], log=log)
        else:
            cats = sorted({_short(x) for x in xs})
            pos = [float(cats.index(_short(x))) for x in xs]
            x_axis = svg.Axis(-0.5, len(cats) - 0.5, categories=cats)
        pos, crossed = pos[:len(points)], pos[len(points):]
        tips = [f"{r.run_id}: {key}={_short(x)} {group.metric} {v:.4f}" for (r, v), x in zip(points, xs)]
        series = [svg.Series(list(zip(pos, values)), [shade(v) for v in values], line=False, marker=5.0, tips=tips)]
        rings = [(x, v) for x, v in zip(pos, values) if v == best]
        if ended:
            series.append(svg.Series([(x, v) for x, (_, v) in zip(crossed, ended)], "#777", line=False, marker=4.0,
                                     crosses=True, tips=[f"{r.run_id} ({_ended(r)}): {key}={_short(r.config.get(key))} "
                                                         f"{group.metric} {v:.4f}" for r, v in ended]))
        y_axis = svg.Axis.fit(values + [v for _, v in ended])
        panels.append(svg.Panel(key, key, group.metric, x_axis, y_axis, series, rings))
    # the colour bar: 20 bands from worst (bottom) to best (top), with the metric's range
    bar = [f'<text class="legend-title" x="0" y="0" font-weight="bold">{svg.esc(group.metric)}</text>']
    for i in range(20):
        v = lo + (hi - lo) * (i + 0.5) / 20
        band_top = 10 + (19 - i) * 10 if group.goal == "maximize" else 10 + i * 10
        bar.append(f'<rect x="0" y="{band_top}" width="16" height="10" fill="{shade(v)}"/>')
    top_v, bottom_v = (hi, lo) if group.goal == "maximize" else (lo, hi)
    bar.append(f'<text class="bar-label" x="22" y="20">{top_v:.4g} (best)</text>'
               f'<text class="bar-label" x="22" y="210">{bottom_v:.4g}</text>')
    title = f"{group.name}: {group.metric} ({group.goal}) by setting; red ring = best" + (
        "; grey × = pruned, diverged or failed" if ended else "")
    return svg.figure(title, panels, bar, 40 + 0.6 * svg.FONT * max(len(group.metric), 14), 220)


def findings(g: Group) -> tuple[str, dict[str, str]]:
    """What the sweep found, above its table: the best run in words (its settings, metric, model artifact
    and the command that trains it again), then parallel coordinates, parameter importance and the
    optimisation history as {file name: SVG}."""
    trials = sweepcharts.trials_of(g.runs, lambda r: grouping.value(r, g.metric))
    for t in trials:  # hover texts name a trial as sweep-status does
        t.number = grouping.trial_number(g, t.run)
    slug, charts = _slug(g.name), {}
    swept = g.params[:MAX_SETTINGS]  # a config that varies in thousands of keys is no sweep to rank
    result = importance.evaluate([(t.run.config, t.value) for t in trials], swept, g.goal, g.log)
    ranked = [s.name for s in result.settings]  # most important first: the axes read in that order
    best = importance.best_of(trials, g.goal, lambda t: t.value)
    parts = [_source(g)]
    if len(g.params) > MAX_SETTINGS:
        parts.append(f"<p>{len(g.params)} settings vary between these runs; the first {MAX_SETTINGS} by name are ranked.</p>")
    if best is not None:
        settings = ", ".join(f"{k} = {sweepcharts.cut(sweepcharts.short(best.run.config.get(k)), 60)}"
                             for k in ranked) or "no swept setting"
        models = "; ".join(a.label() for a in artifact.recorded(best.run.path)) or "none logged"
        command = display.retrain_command(best.run.config, ranked)
        number, took = grouping.trial_number(g, best.run), grouping.seconds(g, best.run)
        which = (f"trial {number}" if number is not None else
                 f"the {_ordinal(_started(g, best.run))} of {len(g.runs)} runs to start")
        which += f", {display.cell(took, '.4g')} s" if took is not None else ""
        parts.append(
            f'<p class="best-run">Best of {len(trials)} completed run(s): <b>{svg.esc(best.run.run_id)}</b> '
            f'({which}; folder {svg.esc(best.run.path.name)}) reached '
            f'{svg.esc(g.metric)} <b>{best.value:.4f}</b> (goal: {svg.esc(g.goal)}) with {svg.esc(settings)}. '
            f'Model artifact: {svg.esc(models)}. '
            + ("Train it again with the same settings (data_dir, output_dir and the settings that pick and tune the "
               f"device, {', '.join(display.DEVICE_BOUND)}, are this host's; set them as usual):</p>"
               f'<pre class="retrain">{svg.esc(command)}</pre>' + _ran_on(best.run) if command else
               "Its recorded config holds a value too long for a command line: no retrain command.</p>"))
    else:
        parts.append(f"<p>No run has completed with a value of {svg.esc(g.metric)} yet "
                     f"(goal: {svg.esc(g.goal)}).</p>")
    drawn = [
        ("parallel", sweepcharts.parallel_svg(f"{g.name}: every completed run through its settings to {g.metric}",
                                              trials, ranked, g.metric, g.goal, g.log)),
        ("importance", sweepcharts.importance_svg(f"{g.name}: which settings mattered for {g.metric}", result, g.metric)
         if g.params and trials else None),
        ("history", sweepcharts.history_svg(f"{g.name}: optimisation history", trials, ranked, g.metric, g.goal)),
    ]
    for kind, chart in drawn:
        if chart is not None:
            charts[f"{slug}-{kind}.svg"] = chart
            parts.append(chart)
    return "".join(parts), charts


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _started(g: Group, run) -> int:
    """1-based: the how-many-th of the group's runs to start (where no sweep storage numbers them)."""
    return sorted(g.runs, key=sweepcharts.started).index(run) + 1


def _ran_on(run) -> str:
    """Which device the run trained on, and its device settings, so that a retrain on another kind of host
    can be made to match (a CPU run repeated on a GPU host uses the GPU unless told otherwise)."""
    text = display.ran_on(run.summary.get("device"), run.config)
    return f'<p class="ran-on">{svg.esc(text)}</p>' if text else ""


def _source(g: Group) -> str:
    """Where the metric and goal the runs are ranked by come from: never a silent guess. Groups made
    by hand (grouping.make_group: tests, the benchmark) were given theirs and say nothing."""
    if g.assumed:
        return (f'<p class="sweep-source assumed">Ranked by <b>{svg.esc(g.metric)} ({svg.esc(g.goal)})</b>, '
                f"assumed: {svg.esc(g.assumed)}. Log axes are judged from the values "
                "(a positive setting spanning a factor of 10 or more).</p>")
    if g.source:
        return (f'<p class="sweep-source">Ranked by {svg.esc(g.metric)} ({svg.esc(g.goal)}) with log axes as '
                f"the sweep defines them, read from {svg.esc(g.source)}.</p>")
    return ""


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1500px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f0;cursor:pointer}tr.best{background:#eaffea}svg.chart{max-width:100%;height:auto;border:1px solid #ddd;margin:.5em 0}
p.assumed{background:#fff6d5;padding:.4em}pre.retrain{background:#f6f6f6;padding:.6em;overflow-x:auto;max-width:1200px}"""


def _best_id(g: Group) -> str | None:
    """The sweep's best run: the best completed one by its metric and goal (the one the page names)."""
    best = importance.best_of(sweepcharts.trials_of(g.runs, lambda r: grouping.value(r, g.metric)), g.goal, lambda t: t.value)
    return best.run.run_id if best is not None else None


def page(root: Path | list[Path], groups: list[Group], problems: list[str]) -> tuple[str, dict[str, str]]:
    """index.html and the charts it shows, as {file name: SVG}."""
    charts: dict[str, str] = {}
    parts = [f"<h1>Offline runs in {svg.esc(_where(root))}</h1>"]
    for g in groups:
        slug = _slug(g.name)
        parts.append(f"<h2>{svg.esc(g.name)}</h2>")
        found, found_charts = findings(g)
        charts.update(found_charts)
        parts.append(found)
        parts.append(table.runs_table(g, _best_id(g)))
        params = params_svg(g)
        if params is not None:
            charts[f"{slug}-params.svg"] = params
            parts.append(params)
        charts[f"{slug}-curves.svg"] = curves_svg(g)
        parts.append(charts[f"{slug}-curves.svg"])
    if problems:
        parts.append("<h2>Runs left out</h2><ul>" + "".join(f"<li>{svg.esc(p)}</li>" for p in problems) + "</ul>")
    index = (f"<!doctype html><html><head><meta charset='utf-8'><title>Offline runs</title>"
             f"<style>{STYLE}</style></head><body>{''.join(parts)}{table.SORT_SCRIPT}</body></html>\n")
    return index, charts


def _where(root: Path | list[Path]) -> str:
    return ", ".join(map(str, root)) if isinstance(root, list) else str(root)


def render(root: Path | list[Path], out: Path, storage: str | None = None,
           environ: dict[str, str] | None = None) -> tuple[Path, list[str]]:
    """Writes the page; returns it and the runs left out (also listed on the page). `storage`: the
    sweeps' storage (--storage), else SWEEP_STORAGE in `environ` (default os.environ), opened first."""
    sources = Sources.open(root if isinstance(root, list) else [root], storage, environ)
    groups, problems = grouping.collect(root, sources)
    if not groups and problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"no readable offline runs under {_where(root)}: {problems[0]}{more}")
    if not groups:
        raise UserError(f"no offline runs under {_where(root)}: pass the folder that holds wandb/offline-run-* (or WANDB_DIR)")
    index, charts = page(root, groups, problems)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {str(out)!r} cannot be made ({exc.strerror or exc}); choose a writable folder") from None
    for name, chart in charts.items():  # the page last: it is never left pointing at charts not yet there
        places.write_text(out / name, chart, "report")
    places.write_text(out / "index.html", index, "report")
    return out / "index.html", problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app report",
                                     description="Render offline runs (and offline sweeps) to SVG charts and a static HTML page.")
    parser.add_argument("path", nargs="*", help="runs folder(s): one sweep's runs may be spread over several "
                                                "(default: $WANDB_DIR, else runs)")
    parser.add_argument("--out", default="report", help="folder for index.html and the SVG charts (default: report)")
    parser.add_argument("--storage", help="the sweeps' journal file or postgresql:// URL, as the agents used it, for "
                                          "each sweep's metric and goal (default: $SWEEP_STORAGE, else "
                                          "sweeps/<name>.journal beside the runs)")
    args = parser.parse_args(argv)
    roots = [Path(p) for p in args.path] or [settings.runs_root()]
    for root in roots:
        if not root.exists():
            raise UserError(f"runs folder {str(root)!r} does not exist")
    places.check_folder(Path(args.out), "--out")  # before reading any run: a place we can't write is one line
    index, problems = render(roots if len(roots) > 1 else roots[0], Path(args.out), args.storage)
    for problem in problems:
        print(f"note: {problem}", file=sys.stderr)
    print(f"report written: {index}")
    return 0
