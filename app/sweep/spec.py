"""Validate a W&B sweep YAML locally, before W&B (or the offline sweep) ever sees it.

W&B accepts many mistakes silently (a metric name the training never logs, a typo in a parameter
name) and the sweep then optimises nothing. Each check here is one line naming the key at fault.

A sweep YAML may come from anyone, so its size is bounded before and after YAML expands it: at most
MAX_BYTES of text, at most MAX_NODES values once anchors and aliases are expanded (a few lines of
aliases can stand for gigabytes), and a grid of at most MAX_GRID points, counted, never built.
Messages quote at most a few dozen characters of any value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app import display
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
MAX_BYTES = 256 * 1024  # a real sweep YAML is a few hundred bytes
MAX_NODES = 20_000  # values after expanding aliases
MAX_GRID = 100_000  # grid points: each is a training run
MAX_MESSAGE = 200

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

    @property
    def grid_size(self) -> int:
        """Grid points, counted without building them (parse refuses a grid over MAX_GRID)."""
        return math.prod(1 if p.distribution == "constant" else len(p.values) for p in self.params)

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point, in W&B's order (last parameter varies fastest)."""
        points: list[dict[str, Any]] = [{}]
        for p in self.params:
            choices = [p.value] if p.distribution == "constant" else list(p.values)
            points = [{**pt, p.name: c} for pt in points for c in choices]
        return points


def short(value: Any, width: int = 40) -> str:
    """repr(value) cut to `width` characters, for error messages about untrusted input."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _first_unknown(keys, allowed) -> str:
    return sorted((str(k) for k in keys if k not in allowed), key=str)[0][:40]


def _infer(name: str, spec: dict) -> str:
    if "distribution" in spec:
        if not isinstance(spec["distribution"], str):
            raise SweepSpecError(f"parameters.{name}.distribution={short(spec['distribution'])} must be a name such as uniform")
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
    if not isinstance(name, str) or name not in KEYS:
        close = difflib.get_close_matches(str(name), KEYS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        shown = name[:40] if isinstance(name, str) else short(name)
        raise SweepSpecError(f"parameters.{shown} is not a training setting ({hint}`python -m app train --help` lists them)")
    if not isinstance(spec, dict):
        raise SweepSpecError(f"parameters.{name} must be a mapping such as {{values: [...]}} or {{min: .., max: ..}}")
    if "parameters" in spec:
        raise SweepSpecError(f"parameters.{name}: nested parameters are not used by this training job")
    if set(spec) - set(PARAM_KEYS):
        raise SweepSpecError(f"parameters.{name}.{_first_unknown(spec, PARAM_KEYS)} is not a W&B parameter key; "
                             f"allowed: {', '.join(PARAM_KEYS)}")
    dist = _infer(name, spec)
    if dist not in DISTRIBUTIONS:
        raise SweepSpecError(f"parameters.{name}.distribution={short(dist)} is not a W&B distribution "
                             "(uniform, categorical, log_uniform_values, q_uniform, int_uniform, ...)")
    for key in DISTRIBUTIONS[dist]:
        if key not in spec:
            raise SweepSpecError(f"parameters.{name}: distribution {dist} needs {key}")
    if "values" in spec and not isinstance(spec["values"], list):
        raise SweepSpecError(f"parameters.{name}.values must be a list such as [0.1, 0.01]")
    values = tuple(spec.get("values") or ())
    if dist == "categorical" and not values:
        raise SweepSpecError(f"parameters.{name}.values must be a non-empty list")
    lo, hi = spec.get("min"), spec.get("max")
    if lo is not None or hi is not None:
        if display.number(lo) is None or display.number(hi) is None:
            raise SweepSpecError(f"parameters.{name}: min and max must be finite numbers")
        if lo >= hi:
            raise SweepSpecError(f"parameters.{name}: min ({lo}) must be below max ({hi})")
        if dist in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values") and lo <= 0:
            raise SweepSpecError(f"parameters.{name}: {dist} needs min > 0")
        if dist == "int_uniform" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise SweepSpecError(f"parameters.{name}: int_uniform needs integer min and max")
    q = spec.get("q")
    if q is not None and not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q < math.inf):
        raise SweepSpecError(f"parameters.{name}.q must be a positive number")
    # every value the sweep can produce must be a valid setting: check the ones we can list
    for candidate in (values or ((spec["value"],) if "value" in spec else ())):
        try:
            merge(Config(), {name: candidate}, source=f"sweep parameters.{name}")
        except ConfigError as exc:
            raise SweepSpecError(str(exc)) from None
    # and a range's two ends, as the sweep produces them (a bounded range reaches both, or as near as
    # makes no difference): lr from -0.1 or batch_size from 0 would fail every trial drawn there
    for end, value in _range_ends(name, dist, lo, hi, spec.get("q")):
        try:
            merge(Config(), {name: value}, source=f"sweep parameters.{name}")
        except ConfigError as exc:
            raise SweepSpecError(f"parameters.{name}: its {end} gives {exc}") from None
    extra = {k: spec[k] for k in ("mu", "sigma", "a", "b", "probabilities") if k in spec}
    return Param(name, dist, spec.get("value"), values, lo, hi, q, extra)


_INT_KEYS = {f.name for f in dataclasses.fields(Config) if f.type in ("int", int)}  # whole-number settings


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _range_ends(name: str, dist: str, lo: Any, hi: Any, q: Any) -> list[tuple[str, Any]]:
    """(which end, the value there) of a bounded distribution, in the setting's terms; [] for the rest
    (normal and its kin are unbounded: each draw is checked as it comes)."""
    if lo is None or hi is None or dist not in DISTRIBUTIONS or not DISTRIBUTIONS[dist]:
        return []
    if dist in ("log_uniform", "q_log_uniform"):  # min and max are exponents
        lo, hi = _exp(lo), _exp(hi)
    elif dist == "inv_log_uniform":  # 1/exp(uniform(min, max))
        lo, hi = _exp(-hi), _exp(-lo)
    ends = [("min", lo), ("max", hi)]
    if dist.startswith("q_") and isinstance(q, (int, float)) and 0 < q < math.inf:
        ends = [(end, round(v / q) * q if math.isfinite(v) else v) for end, v in ends]  # W&B rounds to q
    return [(end, int(round(v)) if name in _INT_KEYS and math.isfinite(v) else v) for end, v in ends]


def _early_terminate(et: Any, metric: str | None) -> dict | None:
    if et is None:
        return None
    if not isinstance(et, dict) or et.get("type") != "hyperband":
        raise SweepSpecError("early_terminate must be {type: hyperband, min_iter: N, eta: 3} (the only type W&B has)")
    allowed = {"type", "min_iter", "max_iter", "s", "eta", "strict"}
    if set(et) - allowed:
        raise SweepSpecError(f"early_terminate.{_first_unknown(et, allowed)} is not a hyperband key; "
                             "allowed: min_iter, max_iter, s, eta, strict")
    if "min_iter" not in et and "max_iter" not in et:
        raise SweepSpecError("early_terminate needs min_iter (or max_iter with s)")
    for key in ("min_iter", "max_iter", "s", "eta"):
        if key in et and not (isinstance(et[key], int) and not isinstance(et[key], bool) and et[key] >= 1):
            raise SweepSpecError(f"early_terminate.{key}={short(et[key])} must be a positive integer")
    if metric not in PER_EPOCH:
        raise SweepSpecError(f"early_terminate needs a per-epoch metric; metric.name={short(metric)} is logged only once (use one of: {', '.join(PER_EPOCH)})")
    return dict(et)


def parse(doc: Any, source: str = "sweep") -> SweepSpec:
    """The checked spec, or SweepSpecError: one line of at most MAX_MESSAGE characters."""
    try:
        return _parse(doc, source)
    except ConfigError as exc:  # also a training setting's own check, quoting the value
        text = str(exc).splitlines()[0] if str(exc) else "invalid sweep config"
        raise SweepSpecError(text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "...") from None


def _parse(doc: Any, source: str) -> SweepSpec:
    count_nodes(doc, source)
    if not isinstance(doc, dict):
        raise SweepSpecError(f"{source}: a sweep config is a YAML mapping with method, metric and parameters")
    if set(doc) - set(TOP_KEYS):
        raise SweepSpecError(f"{source}: unknown key {_first_unknown(doc, TOP_KEYS)!r}; allowed: {', '.join(TOP_KEYS)}")
    method = doc.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise SweepSpecError(f"{source}: method={short(method)} must be one of: {', '.join(METHODS)}")
    metric = doc.get("metric")
    name, goal = None, "minimize"
    if metric is not None:
        if not isinstance(metric, dict) or "name" not in metric:
            raise SweepSpecError(f"{source}: metric must be {{name: val_accuracy, goal: maximize}}")
        name, goal = metric["name"], metric.get("goal", "minimize")
        if not isinstance(name, str) or name not in METRICS:
            raise SweepSpecError(f"{source}: metric.name={short(name)} is never logged by training; logged: {', '.join(METRICS)}")
        if not isinstance(goal, str) or goal not in GOALS:
            raise SweepSpecError(f"{source}: metric.goal={short(goal)} must be minimize or maximize")
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
        size = math.prod(1 if p.distribution == "constant" else len(p.values) for p in params)
        if size > MAX_GRID:
            raise SweepSpecError(f"{source}: the grid has {size:.3g} points, over the {MAX_GRID} a sweep may have; "
                                 "use fewer values, or method random with a run_cap")
    run_cap = doc.get("run_cap")
    if run_cap is not None and not (isinstance(run_cap, int) and not isinstance(run_cap, bool) and run_cap >= 1):
        raise SweepSpecError(f"{source}: run_cap={short(run_cap)} must be a positive integer")
    command = doc.get("command")
    if command is not None:
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise SweepSpecError(f"{source}: command must be a list of strings")
        if not any(m in c for c in command for m in MACROS if m.startswith("${args")):
            raise SweepSpecError(f"{source}: command never passes the sweep's values: add ${{args}}")
    sweep_name = doc.get("name")
    if sweep_name is not None and not isinstance(sweep_name, (str, int, float)):
        raise SweepSpecError(f"{source}: name={short(sweep_name)} must be a short text")
    return SweepSpec(method, name, goal, params, _early_terminate(doc.get("early_terminate"), name), run_cap,
                     None if sweep_name is None else str(sweep_name), doc)


def count_nodes(doc: Any, source: str = "sweep") -> int:
    """Values in `doc` with every alias expanded, refusing past MAX_NODES (an alias bomb, or an alias
    that contains itself, which YAML allows and which never ends)."""
    seen, stack = 0, [doc]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise SweepSpecError(f"{source}: over {MAX_NODES} values once YAML anchors and aliases are expanded; "
                                 "a sweep config is a few dozen")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return seen


def load(path: str | Path) -> SweepSpec:
    path = Path(path)
    shown = str(path)[:120]
    try:
        if path.is_dir():
            raise SweepSpecError(f"sweep config {shown!r} is a folder; give a sweep YAML file such as sweeps/grid.yaml")
        with open(path, "rb") as f:
            blob = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SweepSpecError(f"sweep config {shown!r} does not exist") from None
    except OSError as exc:
        raise SweepSpecError(f"sweep config {shown!r} cannot be read ({exc.strerror or exc})") from None
    if len(blob) > MAX_BYTES:
        raise SweepSpecError(f"sweep config {shown!r} is over {MAX_BYTES // 1024} KiB: not a sweep YAML")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise SweepSpecError(f"sweep config {shown!r} is not a text file (binary content); give a sweep YAML")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SweepSpecError(f"{shown} is not valid YAML{where}") from None
    except RecursionError:  # thousands of nested brackets
        raise SweepSpecError(f"{shown} nests too deeply to be a sweep config") from None
    return parse(doc, source=shown)
