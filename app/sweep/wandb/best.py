"""The line a W&B sweep agent ends with: the sweep's best run so far, as an offline agent ends with its
best trial (app.sweep.optuna.agent's `best so far:`).

    from app.sweep.wandb import best
    print(best.closing_line(server, "entity/project/id", own))    # the warm agent: its Server, its runs
    print(best.closing_line(None, sweep, own, environ))            # the per-run agent: connects itself

The sweep's metric, goal and parameters are in its config on W&B's server, and the runs' values in their
summaries: one GraphQL call (SweepWithRuns, the query `wandb agent` itself reads a sweep with, less the
sampled history), given at most ASK_S and never more than AGENT_OUTAGE_S. The line names the best
finished run of the whole sweep (every agent's), its value, its swept values and the command that trains
it again with every setting it recorded.

When the server cannot be asked (an outage, a refused key) or knows no finished run with the metric yet
(offline runs reach it only with `python -m app sync`), the line says so and falls back to the runs this
agent trained, read from their run logs in the runs folder; the metric is then the sweep's where the server
named it, else val_accuracy (maximize), said to be assumed. Nothing finished with the metric: it says that.
Whatever goes wrong, it is a line, never a traceback: the agent's work is done by then.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from app import display, runlog, settings

ASK_S = 15.0  # the closing question's own bound: an agent that is done does not wait long for a line
DEFAULT_METRIC, DEFAULT_GOAL = "val_accuracy", "maximize"  # as the report ranks a sweep it knows nothing of

QUERY = """
query SweepWithRuns($entity: String, $project: String, $sweep: String!) {
    project(name: $project, entityName: $entity) {
        sweep(sweepName: $sweep) {
            config
            runs {
                edges {
                    node {
                        name
                        state
                        config
                        summaryMetrics
                    }
                }
            }
        }
    }
}
"""


@dataclass
class Run:
    run_id: str
    finished: bool  # ran to its end: not failed, stopped, pruned by early_terminate or skipped as a duplicate
    config: dict[str, Any]
    summary: dict[str, Any]
    swept: list[str] = field(default_factory=list)  # the sweep's parameters, in its order

    def value(self, metric: str) -> float | None:
        return display.number(self.summary.get(metric)) if self.finished else None


@dataclass
class Sweep:
    """What the server holds of the sweep: its metric ("" when its config names none) and its runs."""
    metric: str
    goal: str
    params: list[str]
    runs: list[Run]


def _json(text: Any) -> dict[str, Any]:
    value = json.loads(text) if isinstance(text, str) and text else text
    return value if isinstance(value, dict) else {}


def _values(config: Mapping[str, Any]) -> dict[str, Any]:
    """W&B keeps a run's config as {"key": {"value": v, "desc": ...}}."""
    return {k: v.get("value") if isinstance(v, dict) and "value" in v else v for k, v in config.items()
            if not k.startswith("_")}


def parse(data: Mapping[str, Any]) -> Sweep:
    """The SweepWithRuns answer; ValueError when the server holds no such sweep."""
    sweep = ((data or {}).get("project") or {}).get("sweep")
    if not sweep:
        raise ValueError("the server holds no such sweep")
    config = yaml.safe_load(sweep.get("config") or "{}") or {}
    metric = config.get("metric") or {}
    params = list(config.get("parameters") or {})
    runs = []
    for edge in (sweep.get("runs") or {}).get("edges") or []:
        node = edge.get("node") or {}
        summary = _json(node.get("summaryMetrics"))
        finished = node.get("state") == "finished" and not summary.get("pruned") and not summary.get("duplicate_of")
        runs.append(Run(str(node.get("name")), finished, _values(_json(node.get("config"))), summary, params))
    return Sweep(str(metric.get("name") or ""), "maximize" if metric.get("goal") == "maximize" else "minimize",
                 params, runs)


def path(sweep: str, environ: Mapping[str, str] | None) -> str:
    """SWEEP_ID as ENTITY/PROJECT/ID: a bare id is WANDB_PROJECT's (and WANDB_ENTITY's, else the key's
    default entity), as `wandb agent` reads it."""
    if sweep.count("/") == 2:
        return sweep
    return f"{settings.get('WANDB_ENTITY', environ) or ''}/{settings.get('WANDB_PROJECT', environ)}/{sweep}"


def ask(server, sweep: str, within: float = ASK_S) -> Sweep:
    """The sweep (ENTITY/PROJECT/ID) as W&B's server holds it; Outage when it does not answer within
    `within` seconds."""
    parts = sweep.split("/")
    entity, project, name = (parts[0] or None, parts[1] or None, parts[2]) if len(parts) == 3 else (None, None, parts[-1])
    return parse(server.call(QUERY, {"entity": entity, "project": project, "sweep": name}, within=within))


def _local(folder: Path, sweep_id: str) -> Run | None:
    """A run of this sweep from its log in the runs folder; its swept parameters from the file `wandb
    agent` (or the warm agent) wrote them to."""
    try:
        run = runlog.read(folder)
    except (runlog.RunLogError, OSError):
        return None
    if run.sweep_id != sweep_id or not run.run_id:
        return None
    params = folder.parent / f"sweep-{sweep_id}" / f"config-{run.run_id}.yaml"
    try:
        swept = [k for k in (yaml.safe_load(params.read_text()) or {}) if k != "wandb_version"]
    except (OSError, yaml.YAMLError, AttributeError):
        swept = []
    finished = run.exit_code == 0 and not run.summary.get("pruned") and not run.summary.get("duplicate_of")
    return Run(run.run_id, finished, run.config, run.summary, swept)


def own_runs(environ: Mapping[str, str], sweep_id: str, ids: Iterable[str] | None = None,
             since: float | None = None) -> list[Run]:
    """This agent's runs of the sweep, from their logs under WANDB_DIR/wandb: those named in `ids`, or
    (a `wandb agent`, whose runs are its children's) those whose sweep values were written there since
    `since` (time.time()). The last folder of a run resumed in several is the one that counts. In the
    order the runs started (their first folder's time), so that of runs with the same value the first
    started is the best, as Optuna takes the first of equal trials: the same line whatever order the
    file system lists them in."""
    wandb_dir = settings.runs_root(environ) / "wandb"
    if ids is None:
        written = (wandb_dir / f"sweep-{sweep_id}").glob("config-*.yaml")
        ids = [p.stem[len("config-"):] for p in written if since is None or p.stat().st_mtime >= since]
    started = []
    for run_id in dict.fromkeys(ids):
        folders = sorted(wandb_dir.glob(f"*run-*-{run_id}"), key=lambda p: p.name.split("run-", 1)[1])
        run = _local(folders[-1], sweep_id) if folders else None
        if run is not None:
            started.append((folders[0].name.split("run-", 1)[1], run))
    return [run for _, run in sorted(started, key=lambda sr: sr[0])]


def _best(runs: list[Run], metric: str, goal: str) -> tuple[Run, float, int] | None:
    scored = [(run, v) for run in runs if (v := run.value(metric)) is not None]
    if not scored:
        return None
    run, value = (max if goal == "maximize" else min)(scored, key=lambda rv: rv[1])
    return run, value, len(scored)


def _described(run: Run, value: float, metric: str, where: str) -> str:
    shown = " ".join(f"{k}={display.text(run.config[k])}" for k in run.swept if k in run.config)
    command = display.retrain_command(run.config, run.swept)
    if command is None:
        again = "its recorded config holds a value too long for a command line: no retrain command"
    elif command == "python -m app train":
        again = "no training setting of it is recorded: no retrain command"
    else:  # the command's continuation lines joined: the line stays one line, and pastes as one command
        again = "train it again: " + command.replace(" \\\n    ", " ")
    return f"W&B run {run.run_id}, {metric} {value:.4f} ({shown + '; ' if shown else ''}{where}); {again}"


def line(sweep: str, found: Sweep | None, problem: str, own: list[Run], whose: str = "this agent's runs") -> str:
    """The closing line. `found`: the server's answer (None: it could not be asked, `problem` says why);
    `own`: this agent's runs, the fall-back; `whose`: how they are named."""
    assumed = ""
    if found is not None and found.metric:
        metric, goal = found.metric, found.goal
    else:
        metric, goal = DEFAULT_METRIC, DEFAULT_GOAL
        assumed = f"; ranked by {metric} ({goal}), assumed: " + (
            "the sweep's config names no metric" if found is not None else "the sweep's metric is on the server")
    if found is not None:
        best = _best(found.runs, metric, goal)
        if best is not None:
            run, value, n = best
            return "best so far: " + _described(run, value, metric, f"the best of {n} finished run(s) of sweep {sweep} "
                                                               f"on W&B{assumed}")
        why = f"W&B's server has no finished run of sweep {sweep} with {metric} yet"
        for run in own:  # the server's parameters name the values of runs it has not heard of too
            run.swept = run.swept or found.params
    else:
        why = f"W&B's server could not be asked ({problem})"
    best = _best(own, metric, goal)
    if best is None and found is not None:
        return f"sweep {sweep}: no run has finished with a value of {metric} yet"
    if best is None:
        return f"sweep {sweep}: none of {whose} has finished with a value of {metric} ({why})"
    run, value, n = best
    sync = " (offline runs reach it with `python -m app sync`)" if found is not None else ""
    return (f"best so far of {whose}: " + _described(run, value, metric, f"the best of {n} finished run(s); "
                                                                            f"{why}{sync}{assumed}"))


def closing_line(server, sweep: str, own: list[Run], environ: Mapping[str, str] | None = None,
                 whose: str = "this agent's runs") -> str:
    """The line, asking `server` (or, with None, a connection made here from `environ`) within ASK_S."""
    from app.sweep.wandb.server import Outage, connect, first_line

    try:
        if server is None:
            server = connect(os.environ if environ is None else environ, timeout_s=ASK_S)
        found, problem = ask(server, path(sweep, environ)), ""
    except Outage as outage:
        found, problem = None, str(outage).split(" (WANDB_BASE_URL) ", 1)[-1]
    except Exception as exc:  # a refused key, a deleted sweep, an odd answer: said, not raised
        found, problem = None, first_line(exc)
    return display.visible(line(sweep, found, problem, own, whose))  # names and values come from elsewhere


def no_server_line(sweep: str, own: list[Run], why: str, whose: str = "this agent's runs") -> str:
    """The line when the server is known not to answer (the agent is ending for that): not asked again."""
    return display.visible(line(sweep, None, why, own, whose))
