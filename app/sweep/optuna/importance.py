"""Which swept settings mattered: an importance and a rank correlation with the metric per setting.

    from app.sweep.optuna import importance
    result = importance.evaluate([({"learning_rate": 0.01, "batch_size": 64}, 0.91), ...],
                                 ["learning_rate", "batch_size"], goal="maximize", log={"learning_rate": True})
    for s in result.settings:  # most important first; s.importance / s.correlation may be None, s.note says why
        print(s.name, s.importance, s.low, s.high, s.rough, s.correlation, s.note)
    print(result.method, result.rough)  # in words: trials used, the best set, the bootstrap; why it is rough
    best = importance.best_of(trial_rows, "maximize")  # the best by the goal, of those with a finite value

Importance is Optuna's PED-ANOVA (PedAnovaImportanceEvaluator): for each setting, how far the spread of
its values among the best trials departs from its spread among all trials (a Pearson divergence of two
Parzen estimates). It needs only numpy; Optuna's default fANOVA needs scikit-learn, which the image does
not carry. The shares shown sum to 1 over the settings that varied. W&B's panel uses a random forest's
feature importance instead; both answer "which setting tells the good trials apart".

The correlation is Spearman's (Pearson's on ranks, ties averaged) between a numeric setting and the
metric itself (not goal-adjusted: negative means a larger value gave a smaller metric). It reads a
monotone trend and nothing else; a setting with a sweet spot in the middle has high importance and a
correlation near 0.

How sure it is: each share comes with a 95 % interval, the middle 95 % of the shares over BOOTSTRAP
resamples of the trials (drawn with replacement, from a fixed seed: the same sweep reads the same every
time), and `rough` says in words where the ranking may still change (under ROUGH_BELOW trials, an interval
wider than ROUGH_WIDTH, two neighbours' intervals overlapping). Over MAX_SAMPLE trials a seeded random
sample of that many stands for the sweep, so the cost stays ~1 s however big the sweep grows; the method's
words and `sample` say so.

"The best" is the best 30 % (TARGET_QUANTILE; at least TOP_TRIALS). Measured on synthetic sweeps where
the learning rate explains 79 % of the variance, batch size 5 % and kernels nothing (200 sweeps of 30
trials, 100 of 100): with the best 10 % (5 of 30, Optuna's default) the batch size read over 30 % in 20 of
200 sweeps (90th percentile 30 %; 22 % at 100 trials); with the best 30 % in 12 (25 %; 10 % at 100 trials),
and the learning rate ranked first in 197 of 200 rather than 195.

Honest about its data: below MIN_TRIALS completed trials there is no importance, below
MIN_CORRELATION_TRIALS no correlation, and a setting that never varied among the completed trials gets
neither; each says why in `note` instead of printing a number.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from app import display

MIN_TRIALS = 20  # a setting that alone decides the metric then ranks first in 98 of 100 random sweeps; at 10, in 79
TOP_TRIALS = 5  # "the best" holds at least this many trials, as Optuna's documentation advises
TARGET_QUANTILE = 0.3  # the best 30 %: with 10 % a noise setting's share spread twice as wide (module docstring)
FEW_VALUES = 10  # a numeric setting with at most this many distinct values is a list of choices (W&B `values`)
ROUGH_BELOW = 50  # the method's text warns that the ranking may still change under this many trials
MIN_CORRELATION_TRIALS = 3  # a rank correlation of 2 points is always +-1
MAX_SAMPLE = 500  # a bigger sweep is read through a seeded random sample of this many trials: a fixed cost
BOOTSTRAP = 100  # resamples: ~0.3 s at 30 trials, ~1 s from MAX_SAMPLE on; 1,000 moved the ends by <= 5 points
INTERVAL = (2.5, 97.5)  # percentiles of the resampled shares: a 95 % interval
ROUGH_WIDTH = 0.3  # an interval wider than this share of the total says little about the setting
SEED = 0  # the sample and the resamples are drawn from it: the same sweep reads the same every time


@dataclass
class Setting:
    name: str
    importance: float | None  # share of the total, 0..1; None: see note
    correlation: float | None  # Spearman's rho with the metric, -1..1; None: see note
    note: str = ""  # why a figure is missing ("never varied (always 64)", "categorical", ...)
    varied: bool = True  # False: the same value in every completed trial (or none), so no figure at all
    low: float | None = None  # the share's 95 % bootstrap interval (INTERVAL); None with no importance
    high: float | None = None
    rough: bool = False  # its interval is wide (ROUGH_WIDTH) or overlaps a neighbour's: its rank may change


@dataclass
class Importance:
    method: str  # how the importance was computed, in words
    trials: int  # completed trials with a value of the metric
    settings: list[Setting] = field(default_factory=list)  # most important first; those with no figure last
    note: str = ""  # why there is no importance at all, if so
    sample: int = 0  # trials the figures were computed from (all of them, or MAX_SAMPLE drawn at random)
    best: int = 0  # how many of those are "the best" PED-ANOVA compares with all of them
    bootstrap: int = 0  # resamples behind each interval (0: no importance)
    rough: str = ""  # why the ranking is rough, in words ("" when it is not)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _label(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho; None when either side is constant (no ranking to compare)."""
    rx, ry = ranks(xs), ranks(ys)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def percent(share: float | None) -> str:
    """A share as people read it: "<1%" rather than a "0%" that looks like exactly nothing."""
    if share is None:
        return "-"
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


def interval(s: Setting) -> str:
    """The share's interval as people read it: "30-80%", "0-22%"; "" with no importance."""
    if s.low is None or s.high is None:
        return ""
    return f"{s.low:.0%}".rstrip("%") + f"-{s.high:.0%}"


CORRELATION = ("Correlation: Spearman's rank correlation with the metric (a trend only: a setting with a sweet "
               "spot in the middle can matter much and correlate near 0)")


def method(n: int, sample: int | None = None, bootstrap: int = BOOTSTRAP) -> str:
    """The method in words: what was compared, over how many trials, and where the interval comes from."""
    if n < MIN_TRIALS:
        return (f"Importance: PED-ANOVA (Optuna's PedAnovaImportanceEvaluator), from {MIN_TRIALS} completed trials "
                f"on. {CORRELATION}")
    used = n if sample is None else sample
    drawn = f" (a random sample of {used} of the {n}, drawn with a fixed seed)" if used < n else ""
    return (f"Importance: PED-ANOVA (Optuna's PedAnovaImportanceEvaluator): how differently each setting is spread "
            f"among the best {top_count(used)} of {used} completed trials{drawn} than among all of them, as a share "
            f"of the total; the range is where the middle 95 % of the shares fell when those trials were drawn again "
            f"with replacement {bootstrap} times (a bootstrap). {CORRELATION}")


def top_count(n: int) -> int:
    return max(TOP_TRIALS, math.ceil(TARGET_QUANTILE * n))


T = TypeVar("T")


def best_of(items: Iterable[T], goal: str, value: Callable[[T], Any] = lambda row: row["value"]) -> T | None:
    """The item with the best value for `goal` (maximize: the largest, else the smallest; the first of
    equals), among those whose value is a finite number; None: none has one. Items are trial rows
    (app.sweep.optuna.trials) unless `value` reads them otherwise (the report's runs)."""
    scored = [item for item in items if display.number(value(item)) is not None]
    if not scored:
        return None
    return (max if goal == "maximize" else min)(scored, key=value)


def evaluate(trials: Sequence[tuple[Mapping[str, Any], float]], names: Sequence[str], goal: str,
             log: Mapping[str, bool] | None = None, *, bootstrap: int = BOOTSTRAP, max_sample: int = MAX_SAMPLE,
             seed: int = SEED) -> Importance:
    """Importance (with its interval) and correlation of each setting in `names` over completed `trials`
    ((values, metric) pairs; trials whose metric is missing or not finite are left out). `log`: settings
    the sweep draws on a log scale (PED-ANOVA then estimates their spread in log space). Over `max_sample`
    trials, a random sample of that many (drawn from `seed`) stands for them all, so the cost is bounded."""
    log = log or {}
    rows = [(dict(values), float(v)) for values, v in trials if display.number(v) is not None]
    n = len(rows)
    if n > max_sample:
        rows = random.Random(seed).sample(rows, max_sample)
    result = Importance(method(n, len(rows), bootstrap), n, sample=len(rows))
    varied, constant = [], []
    for name in names:
        seen = {_label(values.get(name)) for values, _ in rows}
        if len(seen) > 1:
            varied.append(name)
        else:
            shown = next(iter(seen)) if seen else "-"
            shown = shown if len(shown) <= 30 else shown[:29] + "…"
            constant.append(Setting(name, None, None, f"never varied among the completed trials (always {shown})"
                                    if seen else "no completed trial", varied=False))
    if n < MIN_TRIALS:
        result.note = (f"importance needs at least {MIN_TRIALS} completed trials with a value of the metric; "
                       f"this sweep has {n}")
    elif not varied:
        result.note = "no setting varied among the completed trials"
    shares: dict[str, tuple[float, float, float]] = {}
    if n >= MIN_TRIALS and varied:
        shares = _ped_anova(rows, varied, goal, log, bootstrap, seed)
        result.best, result.bootstrap = top_count(len(rows)), bootstrap
    for name in varied:
        xs = [display.number(values.get(name)) for values, _ in rows]
        share, low, high = shares.get(name, (None, None, None))
        setting = Setting(name, share, None, low=low, high=high)
        if any(x is None for x in xs):
            setting.note = "categorical: no rank correlation"
        elif len(rows) < MIN_CORRELATION_TRIALS:
            setting.note = f"correlation needs at least {MIN_CORRELATION_TRIALS} completed trials"
        else:
            setting.correlation = spearman(xs, [v for _, v in rows])
            if setting.correlation is None:
                setting.note = "the metric never varied"
        result.settings.append(setting)
    result.settings.sort(key=lambda s: (s.importance is None, -(s.importance or 0.0),
                                        -abs(s.correlation or 0.0)))
    result.rough = _roughness(result, len(rows)) if shares else ""
    result.settings += constant
    return result


def _roughness(result: Importance, used: int) -> str:
    """Marks the settings whose rank is not settled and says, in words, why the ranking is rough."""
    scored = [s for s in result.settings if s.low is not None and s.high is not None]
    wide, close = [], []
    for above, below in zip(scored, scored[1:]):
        if below.high >= above.low:  # the intervals overlap: the two may swap places
            above.rough = below.rough = True
            close.append(f"{above.name} and {below.name}")
    for s in scored:
        if s.high - s.low > ROUGH_WIDTH:
            s.rough = True
            wide.append(f"{s.name} {interval(s)}")
    why = ([f"{used} trials, under {ROUGH_BELOW}"] if used < ROUGH_BELOW else []) + \
          ([f"wide intervals ({', '.join(wide)})"] if wide else []) + \
          ([f"overlapping intervals, the order may change ({'; '.join(close)})"] if close else [])
    return "; ".join(why)


class _Resample:
    """A study as PED-ANOVA reads it, holding the given trials: those made from the rows, or one bootstrap
    resample of them (each draw a trial of its own: PED-ANOVA tells the best apart by trial id). Its
    direction and everything else are the (empty) study's."""

    def __init__(self, study, trials: list):
        self._study, self._trials = study, trials

    def get_trials(self, deepcopy: bool = False, states=None) -> list:
        return list(self._trials)

    def __getattr__(self, name: str):
        return getattr(self._study, name)


def _ped_anova(rows: list[tuple[dict, float]], names: list[str], goal: str, log: Mapping[str, bool],
               bootstrap: int = BOOTSTRAP, seed: int = SEED) -> dict[str, tuple[float, float, float]]:
    """Each setting's share of PED-ANOVA's total importance with its INTERVAL over `bootstrap` resamples,
    computed on Optuna trials made from the rows (the same code path for a sweep's storage and for runs
    read from their logs)."""
    import numpy as np
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import PedAnovaImportanceEvaluator

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    distributions, params = {}, [dict() for _ in rows]
    for name in names:
        xs = [display.number(values.get(name)) for values, _ in rows]
        if all(x is not None for x in xs) and len(set(xs)) > FEW_VALUES:
            # a continuous draw; a few distinct numbers are choices instead: as a range, Parzen estimates
            # spike on them and a noise setting whose best trials share one value outranks the real one
            lo, hi = min(xs), max(xs)
            distributions[name] = FloatDistribution(lo, hi, log=bool(log.get(name)) and lo > 0)
            for p, x in zip(params, xs):
                p[name] = x
        else:  # strings, lists, a mix, a few numbers: categories, by their text
            labels = [_label(values.get(name)) for values, _ in rows]
            distributions[name] = CategoricalDistribution(sorted(set(labels)))
            for p, label in zip(params, labels):
                p[name] = label
    # the trials as PED-ANOVA reads them, each with an id of its own, sharing one set of distribution objects
    # (no storage copies them: grouping trials by distribution is then an identity check, 10x faster)
    study = optuna.create_study(direction="maximize" if goal == "maximize" else "minimize")
    trials = [optuna.trial.create_trial(params=p, distributions=distributions, value=v) for p, (_, v) in zip(params, rows)]
    for i, t in enumerate(trials):
        t._trial_id = t.number = i
    evaluator = PedAnovaImportanceEvaluator(target_quantile=top_count(len(rows)) / len(rows))

    def shares(view) -> list[float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" notes and equal-importance warnings: handled below
            raw = evaluator.evaluate(view, params=names)
        total = sum(max(0.0, v) for v in raw.values())
        # total 0: the best trials look like all the others in every setting
        return [max(0.0, raw[name]) / total if total > 0 else 0.0 for name in names]

    copies = [trials]  # copies[k][i]: trial i drawn a (k+1)-th time in one resample, under an id of its own

    def drawn_again(k: int, i: int):
        while len(copies) <= k:
            layer = [copy.copy(t) for t in trials]
            for t in layer:
                t._trial_id = t.number = t.number + len(copies) * len(trials)
            copies.append(layer)
        return copies[k][i]

    rng = random.Random(seed)
    drawn = []
    for _ in range(bootstrap):
        times = Counter(rng.randrange(len(trials)) for _ in trials)
        drawn.append(shares(_Resample(study, [drawn_again(k, i) for i, n in times.items() for k in range(n)])))
    point = shares(_Resample(study, trials))
    low, high = np.percentile(np.array(drawn), INTERVAL, axis=0) if drawn else (point, point)
    return {name: (point[i], float(low[i]), float(high[i])) for i, name in enumerate(names)}
