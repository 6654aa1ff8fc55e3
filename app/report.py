"""A report of offline runs with no server: `python -m app report [PATH] --out DIR`.

Reads every offline run under PATH (default: $WANDB_DIR, else .) straight from its `.wandb` log and
writes, per group of runs (an offline sweep's trials share its name as their group):
  <group>-curves.png   training loss and the per-epoch val_loss / val_accuracy of every run
  <group>-params.png   each swept setting against the sweep's metric (one point per finished run)
and index.html, which shows them with a table of the runs sorted by the metric. When the sweep's
journal ($WANDB_DIR/sweeps/<group>.journal) came along with the runs, its metric and goal are used,
and attempts that died are listed too.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import runlog, tracking
from .errors import UserError

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


def _value(run, metric: str) -> float | None:
    v = run.summary.get(metric)
    if v is None:
        rows = run.metric(metric)
        v = rows[-1][1] if rows else None
    return float(v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else None


def _sweep_info(root: Path, group: str) -> tuple[str, str, list[dict]]:
    # PATH may be the runs folder (WANDB_DIR) or its wandb/ folder; the journal sits beside wandb/
    journal = next((d / "sweeps" / f"{group}.journal" for d in (root, root.parent)
                    if (d / "sweeps" / f"{group}.journal").is_file()), None)
    if not group or journal is None:
        return DEFAULT_METRIC, DEFAULT_GOAL, []
    import optuna

    from . import offline_sweep

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
        keys = sorted({k for r in members for k in r.config} - NOT_PARAMS)
        params = [k for k in keys if len({repr(r.config.get(k)) for r in members}) > 1]
        sign = -1 if goal == "maximize" else 1
        members.sort(key=lambda r: (_value(r, metric) is None, sign * (_value(r, metric) or 0.0)))
        groups.append(Group(name or "ungrouped", members, metric, goal, params, died))
    return groups, problems


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


def plot_curves(group: Group, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    panels = (("loss", "training loss", "examples seen"), ("val_loss", "val_loss", "epoch"),
              ("val_accuracy", "val_accuracy", "epoch"))
    cmap = plt.get_cmap("tab10" if len(group.runs) <= 10 else "viridis")
    for i, run in enumerate(group.runs):
        color = cmap(i % 10) if len(group.runs) <= 10 else cmap(i / max(1, len(group.runs) - 1))
        style = "-" if run.finished else ":"  # dotted: the run never finished (killed)
        for ax, (key, _, xlabel) in zip(axes, panels):
            if key == "loss":
                points = run.metric(key)
            else:
                points = [(row.get("epoch", j) + 1, row[key]) for j, row in enumerate(r for r in run.history if key in r)]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o" if key != "loss" else None, markersize=3, color=color,
                        label=_label(run, group.params) if ax is axes[0] or key == "val_loss" else None)
    for ax, (key, title, xlabel) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if xlabel == "epoch":
            ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="run", title_fontsize=9)
    fig.suptitle(f"{group.name}: {len(group.runs)} run(s)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(group: Group, path: Path) -> bool:
    """Each swept setting against the metric; False when there is nothing to plot."""
    points = [(r, _value(r, group.metric)) for r in group.runs]
    points = [(r, v) for r, v in points if v is not None and r.finished]
    if not group.params or not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(group.params)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1, 4.2), constrained_layout=True, squeeze=False)
    values = [v for _, v in points]
    best = (max if group.goal == "maximize" else min)(values)
    for ax, key in zip(axes[0], group.params):
        xs = [r.config.get(key) for r, _ in points]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            pos = xs
        else:
            cats = sorted({_short(x) for x in xs})
            pos = [cats.index(_short(x)) for x in xs]
            ax.set_xticks(range(len(cats)), cats)
        sc = ax.scatter(pos, values, c=values, cmap="viridis_r" if group.goal == "minimize" else "viridis",
                        s=60, edgecolors="black", linewidths=0.5)
        for x, v in zip(pos, values):
            if v == best:
                ax.scatter([x], [v], s=220, facecolors="none", edgecolors="red", linewidths=1.5)
        ax.set_xlabel(key)
        ax.set_ylabel(group.metric)
        ax.grid(alpha=0.3)
    fig.colorbar(sc, ax=axes[0, -1], label=group.metric)
    fig.suptitle(f"{group.name}: {group.metric} ({group.goal}) by setting; red ring = best")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
th{background:#f0f0f0}tr:nth-child(2){background:#eaffea}img{max-width:100%;border:1px solid #ddd}"""


def render(root: Path, out: Path) -> Path:
    groups, problems = collect(root)
    if not groups:
        raise UserError(f"no offline runs under {root}: pass the folder that holds wandb/offline-run-* (or WANDB_DIR)")
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>Offline runs in {html.escape(str(root))}</h1>"]
    for g in groups:
        slug = _slug(g.name)
        plot_curves(g, out / f"{slug}-curves.png")
        best = next((r for r in g.runs if _value(r, g.metric) is not None), None)
        parts.append(f"<h2>{html.escape(g.name)}</h2>")
        if best is not None:
            parts.append(f"<p>best: run <b>{html.escape(best.run_id)}</b> {g.metric} {_value(best, g.metric):.4f} "
                         f"({html.escape(_label(best, g.params))}); goal: {g.goal} {g.metric}</p>")
        parts.append(_table(g))
        if plot_params(g, out / f"{slug}-params.png"):
            parts.append(f'<img src="{slug}-params.png" alt="{html.escape(g.name)} settings vs {g.metric}">')
        parts.append(f'<img src="{slug}-curves.png" alt="{html.escape(g.name)} curves">')
    if problems:
        parts.append("<h2>Runs left out</h2><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    index = out / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Offline runs</title>"
                     f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    return index


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app report",
                                     description="Render offline runs (and offline sweeps) to PNG charts and a static HTML page.")
    parser.add_argument("path", nargs="?", help="runs folder (default: $WANDB_DIR, else .)")
    parser.add_argument("--out", default="report", help="folder for index.html and the PNGs (default: report)")
    args = parser.parse_args(argv)
    root = Path(args.path) if args.path else tracking.runs_root(os.environ)
    if not root.exists():
        raise UserError(f"runs folder {str(root)!r} does not exist")
    index = render(root, Path(args.out))
    print(f"report written: {index}")
    return 0
