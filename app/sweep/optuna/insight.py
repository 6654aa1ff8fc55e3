"""What an offline sweep found: its completed trials, the best one, and which settings mattered.

    from app.sweep.optuna import insight
    found = insight.from_study(study)          # a study read from a journal or PostgreSQL (read-only)
    print(insight.format_findings(found))      # the lines sweep-status prints under its trials table
    json.dumps(insight.as_json(study, found))  # sweep-status --json

The importance figures come from app.sweep.optuna.importance, which the report also uses for runs read from
their logs (W&B sweeps, runs copied from several hosts).
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from app import display
from app.sweep.optuna import importance as imp
from app.sweep.optuna.trials import trial_rows

LOG_DISTRIBUTIONS = ("log_uniform", "log_uniform_values", "q_log_uniform", "q_log_uniform_values")


def log_scale(spec: Mapping[str, Any] | None, values: Sequence[Any]) -> bool:
    """Whether a setting is drawn on a log axis: its sweep distribution is a log one; with no
    distribution (a list of values, or runs with no sweep YAML at hand) when its positive values span
    at least a factor of 10, as learning rates listed by hand do."""
    if spec and spec.get("distribution") in LOG_DISTRIBUTIONS:
        return True
    if spec and spec.get("distribution") not in (None, "categorical"):
        return False  # uniform, int_uniform, q_uniform: the sweep itself says linear
    xs = [x for x in map(display.number, values) if x is not None]
    return bool(xs) and len(xs) == len(values) and min(xs) > 0 and max(xs) / min(xs) >= 10


def sweep_parameters(study) -> dict[str, dict]:
    """The sweep YAML's `parameters` as the study stored them when the sweep began ({} if unknown)."""
    try:
        stored = json.loads(study.user_attrs.get("sweep_config") or "{}")
    except ValueError:
        return {}
    params = stored.get("parameters") if isinstance(stored, dict) else None
    return {k: v for k, v in params.items() if isinstance(v, dict)} if isinstance(params, dict) else {}


@dataclass
class Findings:
    name: str
    method: str  # grid | random | bayes | ?
    metric: str
    goal: str
    settings: list[str]  # the swept settings
    log: dict[str, bool]  # setting -> drawn on a log scale
    finished: list[dict]  # trial rows (app.sweep.optuna.trials.trial_rows) that completed with a value
    best: dict | None  # the best of them by the goal
    importance: imp.Importance


def log_settings(study) -> dict[str, bool]:
    """Which swept settings the sweep draws on a log scale (the report's axes), from its storage."""

    trials = study.get_trials(deepcopy=False)
    finished = [r for r in trial_rows(study) if r["state"] == "COMPLETE"]
    return _log_settings(study, trials, sorted({k for t in trials for k in t.params}), finished)


def _log_settings(study, trials, settings: list[str], finished: list[dict]) -> dict[str, bool]:
    specs = sweep_parameters(study)
    log = {}
    for name in settings:
        dist = next((t.distributions[name] for t in trials if name in t.distributions), None)
        if getattr(dist, "log", False):
            log[name] = True
        else:
            log[name] = log_scale(specs.get(name), [r["values"].get(name) for r in finished])
    return log


def from_study(study) -> Findings:

    metric = study.user_attrs.get("metric", "value")
    goal = study.user_attrs.get("goal", "minimize")
    trials = study.get_trials(deepcopy=False)
    settings = sorted({k for t in trials for k in t.params})
    rows = trial_rows(study)
    finished = [r for r in rows if r["state"] == "COMPLETE" and display.number(r["value"]) is not None]
    log = _log_settings(study, trials, settings, finished)
    result = imp.evaluate([(r["values"], r["value"]) for r in finished], settings, goal, log)
    return Findings(study.study_name, study.user_attrs.get("method", "?"), metric, goal, settings, log,
                    finished, imp.best_of(finished, goal), result)


def importance_lines(result: imp.Importance, metric: str) -> list[str]:
    """The importance table as text: one line per setting (its share, the share's 95 % interval, "rough"
    where its rank may change), a note in words where a figure is missing, then the method and why the
    ranking is rough."""
    used = f"; importance from a random sample of {result.sample}" if 0 < result.sample < result.trials else ""
    lines = [f"which settings mattered for {metric} ({result.trials} completed trials{used}):"]
    if result.note:
        lines.append(f"  no importance yet: {result.note}")
    width = max([len(s.name) for s in result.settings] + [7])
    span = max([len(imp.interval(s)) for s in result.settings] + [0])
    for s in result.settings:
        share = imp.percent(s.importance)
        between = f"  (95%: {imp.interval(s).rjust(span)})" if span and imp.interval(s) else " " * (span + 10 if span else 0)
        rho = "-" if s.correlation is None else f"{s.correlation:+.2f}"
        note = "  (" + "; ".join(filter(None, ["rough" if s.rough else "", s.note])) + ")" if s.rough or s.note else ""
        lines.append(f"  {s.name.ljust(width)}  importance {share:>4}{between}  correlation {rho:>5}{note}")
    lines += textwrap.wrap(result.method, 110, initial_indent="  ", subsequent_indent="    ")
    if result.rough:
        lines += textwrap.wrap(f"A rough ranking: {result.rough}.", 110, initial_indent="  ", subsequent_indent="    ")
    return lines


def format_findings(found: Findings) -> str:
    lines = importance_lines(found.importance, found.metric)
    if found.best is not None:
        b = found.best
        lines.append(f"best trial {b['trial']}: {found.metric} {b['value']:.4f}, W&B run {b['run'] or '-'}"
                     + (f", folder {b['run_folder']}" if b.get("run_folder") else ""))
        for k, v in b["values"].items():
            lines.append(f"  {k} = {display.text(v)}" + ("  (swept)" if k in found.settings else ""))
    return "\n".join(lines)


def as_json(study, found: Findings) -> dict[str, Any]:
    """The sweep as sweep-status --json prints it: every trial, the best one and the importance."""

    return {"sweep": found.name, "method": found.method, "metric": found.metric, "goal": found.goal,
            "grid_size": study.user_attrs.get("grid_size"), "settings": found.settings, "log_scale": found.log,
            "trials": trial_rows(study), "best": found.best, "importance": found.importance.as_dict()}


def _finite(v: Any) -> Any:
    """JSON has no NaN or Infinity: a diverged trial's value is written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def json_text(studies: Sequence) -> str:
    return json.dumps([_finite(as_json(s, from_study(s))) for s in studies], indent=2, default=str, allow_nan=False)
