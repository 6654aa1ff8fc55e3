"""`python -m app sweep-status`: the trials table and the best trial of offline sweeps.

    python -m app sweep-status [RUNS] [--config sweeps/grid.yaml | --name NAME] [--storage URL] [--all] [--json]

The counts by state, the last SHOWN trials (`--all`: every one), the best trial, the device it trained
on and the command that trains it again; under them which swept settings mattered (app.sweep.optuna.insight)
and the best trial's settings, read from at most SAMPLE completed trials (`--all`: all). `--json` is always complete.

Read-only: it never creates a study or writes on a journal (a damaged one is refused in one line
with its repair command). `read_sweep` is the same look for other tools (the report). Its settings
(SWEEP_STORAGE, WANDB_DIR) come from the environment and `.env` in the current folder, checked as
`train` checks it; the environment wins.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import optuna

from app import display, runlog, settings, sources
from app.errors import UserError
from app.sweep.optuna import insight
from app.sweep import spec as sweep_spec
from app.sweep.optuna.plan import storage_url, sweep_name
from app.sweep.optuna.storage import load_study, open_storage
from app.sweep.optuna.claims import key_of, outcome
from app.sweep.optuna.trials import ledger_records, rows_of, state_name, trial_rows, whole_trials


def retrain(best: Mapping[str, Any], runs_root: Path | None) -> str:
    """The command that trains the best trial again: every setting its W&B run recorded (the swept ones
    first), read from the run's folder under the runs folder; only the swept values where it isn't there.
    Above it, from the same folder, the device the trial trained on (the command leaves that to the host)."""
    config, device, why = dict(best["values"]), None, "its run folder is not here"
    if runs_root is not None and best.get("run_folder"):
        try:
            run = runlog.read(runs_root / best["run_folder"])
            config, device, why = {**run.config, **best["values"]}, run.summary.get("device"), None
        except (runlog.RunLogError, OSError):
            pass
        except ImportError:  # the small venv beside an image (deploy/slurm/README.md): no W&B to read the run
            why = "W&B is not installed here to read its run folder"
    command = display.retrain_command(config, list(best["values"]))
    ran_on = display.ran_on(device, config)
    lines = [ran_on] if ran_on else []
    if command is None:
        return "\n".join(lines + ["its recorded config holds a value too long for a command line: no retrain command"])
    lines.append("train it again with:\n" + command)
    if why:
        lines.append(f"({why}: settings not swept come from .env and the defaults)")
    return "\n".join(lines)


SHOWN = 20  # trials listed by default: the last ones (`--all`: every one)
SAMPLE = 1000  # completed trials the importance is read from, at most (a random draw, the best among them)


def format_status(study, runs_root: Path | None = None, every: bool = False) -> str:
    """The counts by state, the trials (the last SHOWN, or `every` one), the best trial and its command. The
    trials not listed are read as the ledger reads them (app.sweep.optuna.trials.ledger_records): a sweep of
    20 000 trials is summed up without loading them whole."""
    metric = study.user_attrs.get("metric", "value")
    goal = study.user_attrs.get("goal", "minimize")
    grid = study.user_attrs.get("method") == "grid"
    storage, sid = study._storage, study._study_id
    records = [t for t in ledger_records(storage, sid) if outcome(t) != "void"]
    listed = records if every or len(records) <= SHOWN else records[-SHOWN:]
    rows = trial_rows(study) if every else rows_of(whole_trials(storage, sid, [t._trial_id for t in listed]), grid)
    names = sorted({k for r in rows for k in r["values"]})
    header = ["trial", "state", *names, metric, "run", "attempt", "seconds", "agent"]
    table = [[str(r["trial"]), r["state"], *[display.cell(r["values"].get(n)) for n in names], display.cell(r["value"]),
              r["run"] or "-", str(r["attempt"]), display.cell(r["seconds"]), r["agent"] or "-"] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    lines = [f"sweep {study.study_name}: {study.user_attrs.get('method', '?')}, {goal} {metric}"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    if len(listed) < len(records):
        lines.append(f"(the last {len(listed)} of {len(records):,} trials; --all lists every one)")
    states = [state_name(t) for t in records]
    summary = ", ".join(f"{states.count(s)} {s.lower()}" for s in dict.fromkeys(states)) or "no trials yet"
    size = study.user_attrs.get("grid_size")
    done_points = len({key_of(t, grid) or "" for t, s in zip(records, states) if s in ("COMPLETE", "PRUNED", "DIVERGED")})
    lines.append(summary + (f"; {done_points} of {size} grid points done" if size else ""))
    complete = [t for t, s in zip(records, states) if s == "COMPLETE" and t.value is not None]
    if complete:
        best_trial = (max if goal == "maximize" else min)(complete, key=lambda t: t.value)
        best = rows_of(whole_trials(storage, sid, [best_trial._trial_id]), grid)[0]
        shown = " ".join(f"{k}={display.cell(v)}" for k, v in best["values"].items())
        lines.append(f"best: trial {best['trial']} {metric} {best['value']:.4f}  {shown}  (W&B run {best['run']})")
        lines.append(retrain(best, runs_root))
    else:
        lines.append("best: none complete yet")
    return "\n".join(lines)


class _Sampled:
    """A study as insight.from_study reads it, holding only some of its trials."""

    def __init__(self, study, trials: list):
        self._study, self._trials = study, trials

    def get_trials(self, deepcopy: bool = False, states=None) -> list:
        return [t for t in self._trials if states is None or t.state in states]

    def __getattr__(self, name: str):
        return getattr(self._study, name)


def findings_text(study, every: bool = False) -> str:
    """Which settings mattered (insight.format_findings). A sweep of more than SAMPLE completed trials is
    read from a random SAMPLE of them with its best among them (importance looks at the trials near the
    best, and the best trial shown stays the sweep's), said in a line under the findings; `every`: all."""
    storage, sid = study._storage, study._study_id
    complete = [t for t in ledger_records(storage, sid) if state_name(t) == "COMPLETE" and t.value is not None]
    if every or len(complete) <= SAMPLE:
        return insight.format_findings(insight.from_study(study))
    goal = study.user_attrs.get("goal", "minimize")
    best = (max if goal == "maximize" else min)(complete, key=lambda t: t.value)
    others = [t for t in complete if t is not best]
    drawn = {t._trial_id for t in random.Random(0).sample(others, SAMPLE - 1)} | {best._trial_id}
    found = insight.from_study(_Sampled(study, whole_trials(storage, sid, drawn)))
    return (insight.format_findings(found) + f"\n(read from {len(drawn):,} of the {len(complete):,} completed trials, "
            "drawn at random, the best among them; --all reads every one)")


def find_studies(environ: Mapping[str, str], config: str | None, name: str | None, storage: str | None):
    """(storage url, study name) pairs that sweep-status should show. `storage` (--storage) wins over
    SWEEP_STORAGE in `environ`."""
    if storage:
        environ = {**environ, "SWEEP_STORAGE": storage}
    if config:
        p_name = sweep_name(sweep_spec.load(config), config)
        return [(storage_url(environ, p_name), p_name)]
    if settings.is_set("SWEEP_STORAGE", environ):
        url = storage_url(environ, "x")
        if name:
            return [(url, name)]

        return [(url, s.study_name) for s in optuna.get_all_study_summaries(open_storage(url, write=False), include_best_trial=False)]
    folder = settings.runs_root(environ) / "sweeps"
    if name:
        return [(str(folder / f"{name}.journal"), name)]
    return [(str(f), f.stem) for f in sorted(folder.glob("*.journal"))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app sweep-status",
                                     description="The trials table and the best trial of offline sweeps.")
    parser.add_argument("path", nargs="?", help="runs folder holding sweeps/*.journal (default: $WANDB_DIR, else runs)")
    parser.add_argument("--config", help="the sweep YAML (its name: picks the study)")
    parser.add_argument("--name", help="the sweep name (default: every sweep in the storage)")
    parser.add_argument("--storage", help="journal file or postgresql:// URL (default: $SWEEP_STORAGE, "
                                          "else every $WANDB_DIR/sweeps/*.journal)")
    parser.add_argument("--all", action="store_true", dest="every",
                        help=f"list every trial and read the importance from all of them (default: the last {SHOWN} "
                             f"trials, and at most {SAMPLE} completed ones for the importance)")
    parser.add_argument("--json", action="store_true", help="print a JSON list: per sweep every trial, the best trial "
                                                            "and parameter importance (always complete)")
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    environ = dict(os.environ)
    sources.apply_dotenv(environ)  # SWEEP_STORAGE, WANDB_DIR from .env, as `train` reads it; the environment wins
    if args.path:
        environ["WANDB_DIR"] = args.path
    found = find_studies(environ, args.config, args.name, args.storage)
    if not found:
        raise UserError(f"no offline sweep found under {settings.runs_root(environ) / 'sweeps'}; "
                        "pass the runs folder, --config, --name or --storage")
    if args.json:
        print(insight.json_text([load_study(url, study_name) for url, study_name in found]))
        return 0
    for i, (url, study_name) in enumerate(found):
        study = load_study(url, study_name)
        if i:
            print()
        print(format_status(study, settings.runs_root(environ), every=args.every))
        print(findings_text(study, every=args.every))
    return 0


@dataclass(frozen=True)
class SweepSummary:
    """What another tool needs to know about an offline sweep (the report's chart and its table of
    trials that did not finish)."""

    metric: str
    goal: str
    unfinished: list[dict[str, Any]]  # trial_rows of trials that died, were stopped or failed
    log: dict[str, bool]  # swept settings the sweep draws on a log scale


def summarize(study) -> SweepSummary:
    """An offline sweep's metric, goal, unfinished trials and log-scale settings, as its study holds them
    (the metric and goal an agent recorded when the sweep began)."""
    rows = [r for r in trial_rows(study) if r["state"] in ("DIED", "STOPPED", "FAIL")]
    return SweepSummary(study.user_attrs.get("metric", "val_loss"), study.user_attrs.get("goal", "minimize"), rows,
                        insight.log_settings(study))


def read_sweep(journal: str | Path, name: str) -> SweepSummary:
    """summarize() of a sweep in a journal file or database, read without writing anything.
    Raises UserError (one line) when the storage is missing, damaged or lacks the sweep."""
    return summarize(load_study(str(journal), name))
