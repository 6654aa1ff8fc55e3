"""Validate a W&B sweep YAML locally, before W&B (or the offline sweep) ever sees it.

W&B accepts many mistakes silently (a metric name the training never logs, a typo in a parameter
name) and the sweep then optimises nothing. Each check here is one line naming the key at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.config import KEYS, Config, ConfigError, merge

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
# what `train` logs, and which of those are logged once per epoch (usable for early termination)
METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "loss", "examples_per_s")
PER_EPOCH = ("val_accuracy", "val_loss", "examples_per_s")
TOP_KEYS = ("program", "method", "metric", "parameters", "early_terminate", "command", "name",
            "description", "project", "entity", "run_cap")
MACROS = ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}",
          "${args_json_file}", "${args_no_boolean_flags}")

# distribution -> the bound keys it needs
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "constant": ("value",),
    "categorical": ("values",),
    "int_uniform": ("min", "max"),
    "uniform": ("min", "max"),
    "q_uniform": ("min", "max"),
    "log_uniform": ("min", "max"),
    "log_uniform_values": ("min", "max"),
    "q_log_uniform": ("min", "max"),
    "q_log_uniform_values": ("min", "max"),
    "inv_log_uniform": ("min", "max"),
    "inv_log_uniform_values": ("min", "max"),
    "normal": (),
    "q_normal": (),
    "log_normal": (),
    "q_log_normal": (),
    "beta": (),
    "q_beta": (),
}
PARAM_KEYS = ("distribution", "value", "values", "probabilities", "min", "max", "q", "mu", "sigma", "a", "b")


class SweepSpecError(ConfigError):
    pass


@dataclass(frozen=True)
class Param:
    name: str
    distribution: str
    value: Any = None
    values: tuple = ()
    min: float | None = None
    max: float | None = None
    q: float | None = None
    extra: dict = field(default_factory=dict)  # mu, sigma, a, b, probabilities


@dataclass(frozen=True)
class SweepSpec:
    method: str
    metric: str | None
    goal: str
    params: tuple[Param, ...]
    early_terminate: dict | None
    run_cap: int | None
    name: str | None
    raw: dict

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point, in W&B's order (last parameter varies fastest)."""
        points: list[dict[str, Any]] = [{}]
        for p in self.params:
            choices = [p.value] if p.distribution == "constant" else list(p.values)
            points = [{**pt, p.name: c} for pt in points for c in choices]
        return points


def _infer(name: str, spec: dict) -> str:
    if "distribution" in spec:
        return spec["distribution"]
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        ints = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    raise SweepSpecError(f"parameters.{name} needs value, values, or min and max (or a distribution)")


def _param(name: str, spec: Any) -> Param:
    if name not in KEYS:
        raise SweepSpecError(f"parameters.{name} is not a training setting; known: {', '.join(KEYS)}")
    if not isinstance(spec, dict):
        raise SweepSpecError(f"parameters.{name} must be a mapping such as {{values: [...]}} or {{min: .., max: ..}}")
    if "parameters" in spec:
        raise SweepSpecError(f"parameters.{name}: nested parameters are not used by this training job")
    unknown = sorted(set(spec) - set(PARAM_KEYS))
    if unknown:
        raise SweepSpecError(f"parameters.{name}.{unknown[0]} is not a W&B parameter key; allowed: {', '.join(PARAM_KEYS)}")
    dist = _infer(name, spec)
    if dist not in DISTRIBUTIONS:
        raise SweepSpecError(f"parameters.{name}.distribution={dist!r} is not a W&B distribution; allowed: {', '.join(DISTRIBUTIONS)}")
    for key in DISTRIBUTIONS[dist]:
        if key not in spec:
            raise SweepSpecError(f"parameters.{name}: distribution {dist} needs {key}")
    values = tuple(spec.get("values") or ())
    if dist == "categorical" and not values:
        raise SweepSpecError(f"parameters.{name}.values must be a non-empty list")
    lo, hi = spec.get("min"), spec.get("max")
    if lo is not None or hi is not None:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise SweepSpecError(f"parameters.{name}: min and max must be numbers")
        if lo >= hi:
            raise SweepSpecError(f"parameters.{name}: min ({lo}) must be below max ({hi})")
        if dist in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values") and lo <= 0:
            raise SweepSpecError(f"parameters.{name}: {dist} needs min > 0")
        if dist == "int_uniform" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise SweepSpecError(f"parameters.{name}: int_uniform needs integer min and max")
    q = spec.get("q")
    if q is not None and not (isinstance(q, (int, float)) and q > 0):
        raise SweepSpecError(f"parameters.{name}.q must be a positive number")
    # every value the sweep can produce must be a valid setting: check the ones we can list
    for candidate in (values or ((spec["value"],) if "value" in spec else ())):
        try:
            merge(Config(), {name: candidate}, source=f"sweep parameters.{name}")
        except ConfigError as exc:
            raise SweepSpecError(str(exc)) from None
    extra = {k: spec[k] for k in ("mu", "sigma", "a", "b", "probabilities") if k in spec}
    return Param(name, dist, spec.get("value"), values, lo, hi, q, extra)


def _early_terminate(et: Any, metric: str | None) -> dict | None:
    if et is None:
        return None
    if not isinstance(et, dict) or et.get("type") != "hyperband":
        raise SweepSpecError("early_terminate must be {type: hyperband, min_iter: N, eta: 3} (the only type W&B has)")
    unknown = sorted(set(et) - {"type", "min_iter", "max_iter", "s", "eta", "strict"})
    if unknown:
        raise SweepSpecError(f"early_terminate.{unknown[0]} is not a hyperband key; allowed: min_iter, max_iter, s, eta, strict")
    if "min_iter" not in et and "max_iter" not in et:
        raise SweepSpecError("early_terminate needs min_iter (or max_iter with s)")
    for key in ("min_iter", "max_iter", "s", "eta"):
        if key in et and not (isinstance(et[key], int) and et[key] >= 1):
            raise SweepSpecError(f"early_terminate.{key}={et[key]!r} must be a positive integer")
    if metric not in PER_EPOCH:
        raise SweepSpecError(f"early_terminate needs a per-epoch metric; metric.name={metric!r} is logged only once (use one of: {', '.join(PER_EPOCH)})")
    return dict(et)


def parse(doc: Any, source: str = "sweep") -> SweepSpec:
    if not isinstance(doc, dict):
        raise SweepSpecError(f"{source}: a sweep config is a YAML mapping with method, metric and parameters")
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise SweepSpecError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(TOP_KEYS)}")
    method = doc.get("method")
    if method not in METHODS:
        raise SweepSpecError(f"{source}: method={method!r} must be one of: {', '.join(METHODS)}")
    metric = doc.get("metric")
    name, goal = None, "minimize"
    if metric is not None:
        if not isinstance(metric, dict) or "name" not in metric:
            raise SweepSpecError(f"{source}: metric must be {{name: val_accuracy, goal: maximize}}")
        name, goal = metric["name"], metric.get("goal", "minimize")
        if name not in METRICS:
            raise SweepSpecError(f"{source}: metric.name={name!r} is never logged by training; logged: {', '.join(METRICS)}")
        if goal not in GOALS:
            raise SweepSpecError(f"{source}: metric.goal={goal!r} must be minimize or maximize")
    elif method == "bayes":
        raise SweepSpecError(f"{source}: method bayes needs a metric to optimise")
    params_doc = doc.get("parameters")
    if not isinstance(params_doc, dict) or not params_doc:
        raise SweepSpecError(f"{source}: parameters must map setting names to their search spaces")
    params = tuple(_param(n, s) for n, s in params_doc.items())
    if method == "grid":
        for p in params:
            if p.distribution not in ("constant", "categorical"):
                raise SweepSpecError(f"{source}: grid search needs value or values for every parameter; parameters.{p.name} is {p.distribution}")
    run_cap = doc.get("run_cap")
    if run_cap is not None and not (isinstance(run_cap, int) and run_cap >= 1):
        raise SweepSpecError(f"{source}: run_cap={run_cap!r} must be a positive integer")
    command = doc.get("command")
    if command is not None:
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise SweepSpecError(f"{source}: command must be a list of strings")
        if not any(m in c for c in command for m in MACROS if m.startswith("${args")):
            raise SweepSpecError(f"{source}: command never passes the sweep's values: add ${{args}}")
    return SweepSpec(method, name, goal, params, _early_terminate(doc.get("early_terminate"), name), run_cap,
                     doc.get("name"), doc)


def load(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepSpecError(f"sweep config {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SweepSpecError(f"{path} is not valid YAML{where}") from None
    return parse(doc, source=str(path))
