"""The report's runs, read and grouped: every offline run under the folders, one group per sweep.

    from app.runs import grouping
    found, problems = grouping.collect([Path("host0/runs"), Path("host1/runs")])  # runs of one sweep may be spread
    for g in found:                                  # g.runs best first by the sweep's metric and goal
        print(g.name, g.metric, g.goal, g.params, [grouping.value(r, g.metric) for r in g.runs])

An offline sweep's trials share its name as their group, a W&B sweep's runs its sweep id. Each sweep's
metric, goal and log-scale settings come from its storage where one is found (app.runs.ranking); runs
whose log cannot be read are left out and said in `problems`. The page is drawn by app.runs.report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from app import display, runlog
from app.runs.ranking import DEFAULT_GOAL, DEFAULT_METRIC, Sources

NOT_PARAMS = {"data_dir", "output_dir", "device"}  # differ between hosts, not between trials


@dataclass
class Group:
    name: str
    runs: list  # runlog.OfflineRun, sorted by the metric
    metric: str
    goal: str
    params: list[str]  # config keys whose values differ between the runs
    died: list[dict]  # attempts the sweep storage saw die, if it is here
    log: dict[str, bool] = field(default_factory=dict)  # swept settings drawn on a log scale
    source: str = ""  # where metric and goal were read (app.runs.ranking), said on the page
    assumed: str = ""  # else why they are the defaults, said on the page
    trials: dict[str, dict] = field(default_factory=dict)  # run id -> {"trial", "seconds"} from the sweep's storage


def value(run, metric: str) -> float | None:
    """The run's value of the metric: its summary's, else the last one logged; None: missing or not finite."""
    v = run.summary.get(metric)
    if v is None:
        rows = run.metric(metric)
        v = rows[-1][1] if rows else None
    return display.number(v)


def state(run) -> str:
    """How a run ended, in the words sweep-status uses: finished, diverged, pruned, killed (never finished), exit N."""
    return ("diverged" if run.summary.get("diverged") else "pruned" if run.summary.get("pruned") else
            "finished" if run.finished and run.exit_code == 0 else "killed" if not run.finished else f"exit {run.exit_code}")


def trial_number(group: Group, run) -> int | None:
    """The run's trial number as sweep-status shows it: from the sweep's storage, else from the name an
    offline agent gives its trial's run (<sweep>-<trial number>); None for other runs (a W&B sweep
    numbers its runs on its server)."""
    if run.run_id in group.trials:
        return group.trials[run.run_id]["trial"]
    found = re.fullmatch(re.escape(run.group) + r"-(\d{1,9})", run.name) if run.group and run.name else None
    return int(found.group(1)) if found else None


def seconds(group: Group, run) -> float | None:
    """How long the run took: as sweep-status counts it (the trial's start to its end, in the storage),
    else as W&B counted it (None: it never finished)."""
    stored = display.number(group.trials.get(run.run_id, {}).get("seconds"))
    return stored if stored is not None else run.runtime


def _log_scale(group: Group, from_sweep: dict[str, bool]) -> dict[str, bool]:
    """Which swept settings are drawn on a log scale: as the sweep draws them where its storage was
    found, else judged from the values (app.sweep.optuna.insight.log_scale)."""
    from app.sweep.optuna import insight

    return {k: from_sweep[k] if k in from_sweep else insight.log_scale(None, [r.config.get(k) for r in group.runs])
            for k in group.params}


def group_name(run) -> str:
    """An offline sweep's trials share its name as their group; a W&B sweep's runs share its id."""
    return run.group or (f"wandb-sweep-{run.sweep_id}" if run.sweep_id else "")


def collect(root: Path | list[Path], sources: Sources | None = None) -> tuple[list[Group], list[str]]:
    """Every run under the folder(s), grouped; runs of one sweep may be spread over several folders.
    Each sweep's metric and goal come from `sources` (default: journals beside the runs only)."""
    roots = root if isinstance(root, list) else [root]
    sources = sources if sources is not None else Sources(roots)
    runs, problems = [], []
    folders = sorted({f for r in roots for f in runlog.find(r)})
    for folder in folders:
        try:
            run = runlog.read(folder)
        except (runlog.RunLogError, OSError) as exc:
            problems.append(f"{folder}: {exc}")
            continue
        if run.empty or not run.run_id:
            # 0 bytes: W&B had not written yet (a run just starting, or stopped then): nothing to show
            problems.append(f"{folder}: empty log (no W&B record yet)")
            continue
        if run.damaged:
            problems.append(f"{folder}: damaged log, shown from what could be read ({'; '.join(run.damaged[:3])})")
        runs.append(run)
    groups = []
    for name in sorted({group_name(r) for r in runs}):
        members = [r for r in runs if group_name(r) == name]
        found = sources.definition(name, wandb_sweep=not members[0].group and bool(members[0].sweep_id))
        group = make_group(name, members, found.metric, found.goal, found.died)
        group.log = _log_scale(group, found.log)
        group.source, group.assumed, group.trials = found.source, found.assumed, found.trials
        groups.append(group)
    return groups, problems


def make_group(name: str, runs: list, metric: str = DEFAULT_METRIC, goal: str = DEFAULT_GOAL,
               died: list[dict] | None = None) -> Group:
    """Runs of one group, best first, with the settings that vary between them."""
    keys = sorted({k for r in runs for k in r.config} - NOT_PARAMS)
    params = [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]
    sign = -1 if goal == "maximize" else 1
    runs = sorted(runs, key=lambda r: (value(r, metric) is None, sign * (value(r, metric) or 0.0)))
    return Group(name or "ungrouped", runs, metric, goal, params, died or [])
