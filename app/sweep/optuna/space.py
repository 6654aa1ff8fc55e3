"""W&B sweep parameters as Optuna distributions, for offline sweeps (app.sweep.optuna.storage, app.sweep.optuna.agent).

Every form Optuna can express is mapped; the rest (normal, beta, inv_log_uniform, weighted categories)
is refused with one line naming the parameter. Optuna has no quantised log distribution, so the q_log
forms sample log-uniform and round to q when the value is applied, which is W&B's own definition.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from app.config import Config
from app.sweep.spec import Param, SweepSpec, SweepSpecError

SUPPORTED = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
             "log_uniform_values", "q_log_uniform", "q_log_uniform_values")
INT_KEYS = {f.name for f in dataclasses.fields(Config) if f.type in ("int", int)}


@dataclass(frozen=True)
class Dimension:
    """One searched setting: the Optuna distribution and how a sampled value becomes a config value."""

    name: str
    distribution: Any  # optuna.distributions.BaseDistribution
    quantum: float | None = None  # q of a quantised log distribution: Optuna has no log+step, so round after
    encoded: bool = False  # categorical values Optuna can't store (lists) travel as JSON strings

    def suggest(self, trial) -> Any:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(self.name, d.choices)
        if isinstance(d, IntDistribution):
            return trial.suggest_int(self.name, d.low, d.high, step=d.step, log=d.log)
        return trial.suggest_float(self.name, d.low, d.high, step=d.step, log=d.log)

    def apply(self, raw: Any) -> Any:
        """The config value for an Optuna value: decoded, quantised, typed as the setting."""
        if self.encoded:
            return json.loads(raw)
        value = raw
        if self.quantum is not None:
            value = round(raw / self.quantum) * self.quantum
        if self.name in INT_KEYS:
            return int(round(value))
        if isinstance(value, float):
            value = float(f"{value:.12g}")  # 0.1 * 3 -> 0.3, not 0.30000000000000004
        return value


@dataclass(frozen=True)
class SearchSpace:
    constants: dict[str, Any]
    dimensions: tuple[Dimension, ...]

    def grid_space(self) -> dict[str, list]:
        return {d.name: list(d.distribution.choices) for d in self.dimensions}

    def values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Config values of a trial: the constants plus each dimension's applied value."""
        out = dict(self.constants)
        for d in self.dimensions:
            if d.name in params:
                out[d.name] = d.apply(params[d.name])
        return out


def _dimension(p: Param) -> Dimension:
    where = f"parameters.{p.name}"
    is_int = p.name in INT_KEYS
    dist = p.distribution
    if dist not in SUPPORTED:
        raise SweepSpecError(f"{where}: distribution {dist} has no Optuna equivalent for an offline sweep; "
                             f"use one of: {', '.join(SUPPORTED)}")
    if dist == "categorical":
        if "probabilities" in p.extra:
            raise SweepSpecError(f"{where}.probabilities: Optuna draws categories with equal probability; "
                                 "remove probabilities (or repeat a value in values to weight it)")
        encoded = any(not (v is None or isinstance(v, (bool, int, float, str))) for v in p.values)
        choices = tuple(json.dumps(v) for v in p.values) if encoded else tuple(p.values)
        return Dimension(p.name, CategoricalDistribution(choices), encoded=encoded)
    lo, hi, q = p.min, p.max, p.q
    if dist == "int_uniform":
        return Dimension(p.name, IntDistribution(int(lo), int(hi)))
    if dist == "uniform":
        if is_int:
            raise SweepSpecError(f"{where}: uniform draws real numbers but {p.name} is an integer setting; "
                                 "use int_uniform, or q_uniform with an integer q")
        return Dimension(p.name, FloatDistribution(float(lo), float(hi)))
    if dist == "q_uniform":
        q = q if q is not None else 1
        if is_int and not float(q).is_integer():
            raise SweepSpecError(f"{where}: q={q} must be a whole number for the integer setting {p.name}")
        # W&B returns multiples of q: sample exactly the multiples of q inside [min, max]
        k_lo, k_hi = math.ceil(lo / q - 1e-9), math.floor(hi / q + 1e-9)
        if k_lo > k_hi:
            raise SweepSpecError(f"{where}: no multiple of q={q} lies between min={lo} and max={hi}")
        if is_int:
            return Dimension(p.name, IntDistribution(int(k_lo * q), int(k_hi * q), step=int(q)))
        return Dimension(p.name, FloatDistribution(k_lo * q, k_lo * q + (k_hi - k_lo) * q, step=q), quantum=q)
    if dist in ("log_uniform", "q_log_uniform"):
        lo, hi = math.exp(lo), math.exp(hi)  # W&B: exp(uniform(min, max)); min and max are exponents
    if dist in ("log_uniform", "log_uniform_values"):
        if is_int:
            if dist == "log_uniform":
                raise SweepSpecError(f"{where}: log_uniform draws real numbers but {p.name} is an integer setting; "
                                     "use q_log_uniform_values with q: 1")
            if lo < 1 or not (float(lo).is_integer() and float(hi).is_integer()):
                raise SweepSpecError(f"{where}: the integer setting {p.name} needs whole-number min >= 1 and max")
            return Dimension(p.name, IntDistribution(int(lo), int(hi), log=True))
        return Dimension(p.name, FloatDistribution(float(lo), float(hi), log=True))
    # q_log_uniform(_values): round(exp(uniform(log min, log max)) / q) * q
    q = q if q is not None else 1
    if is_int and not float(q).is_integer():
        raise SweepSpecError(f"{where}: q={q} must be a whole number for the integer setting {p.name}")
    if is_int and q == 1 and lo >= 1 and float(lo).is_integer() and float(hi).is_integer():
        return Dimension(p.name, IntDistribution(int(lo), int(hi), log=True))
    return Dimension(p.name, FloatDistribution(float(lo), float(hi), log=True), quantum=float(q))


def search_space(spec: SweepSpec) -> SearchSpace:
    constants = {p.name: p.value for p in spec.params if p.distribution == "constant"}
    dims = tuple(_dimension(p) for p in spec.params if p.distribution != "constant")
    if not dims:
        raise SweepSpecError("parameters: every parameter is a constant; an offline sweep needs one that varies")
    return SearchSpace(constants, dims)
