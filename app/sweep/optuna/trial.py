"""One offline-sweep trial as one offline W&B run: config, resume, train, read the metric back.

Used by app.sweep.optuna.agent (`python -m app offline-agent`); nothing here decides which trial runs.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path
from typing import Mapping

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from app import checkpoint, interrupts, runid, tracking
from app.config import Config, ConfigError
from app.errors import UserError
from app.sweep.optuna.claims import TrialHeartbeat
from app.sweep.optuna.storage import storage_down, storage_problem

JOB_TYPE = "sweep-trial"
TAG = "offline-sweep"


class Dropped(Exception):
    """This trial must not train (a duplicate, over the cap, or taken over by another agent)."""


def say(msg: str) -> None:
    print(f"[offline-sweep] {msg}", flush=True)


def _run_folder(root: Path, run_id: str) -> Path | None:
    found = sorted((root / "wandb").glob(f"*run-*-{run_id}"))
    return found[-1] if found else None


def _completed(agent) -> tuple[str, str, list[float]] | None:
    """(metric, goal, [the best value of a completed trial so far]) of the agent's sweep, for the model's best
    alias: from the agent's ledger, brought up to date with what finished since it last looked (never the
    whole sweep read again: that grew every trial's cost with the sweep)."""
    try:
        best = agent.ledger().best
    except Exception:  # a read-only look for an alias: never a reason to fail a finished run
        return None
    return agent.p.metric, agent.p.goal, [] if best is None else [best.value]


def worst(goal: str) -> float:
    """A diverged trial's value: the sweep's metric at its worst. Told to the study as COMPLETE with it, not
    as FAIL: samplers learn from COMPLETE trials only, so TPE puts a diverged trial among its bad ones and
    draws less from where it lies, where a FAIL would leave that region as untried as before (random
    search ignores values; the grid counts the point as done either way). Optuna refuses NaN, not inf:
    TPE ranks trials by sorting their values, where inf (-inf for maximize) is simply the last."""
    return -math.inf if goal == "maximize" else math.inf


def train_trial(agent, trial, key: str, values: dict, beat: TrialHeartbeat) -> tuple[str, float | None]:
    from app.train import Preempted, train

    p = agent.p
    run_id = tracking.new_run_id()
    try:
        config = p.base.replace(**values)
    except ConfigError as exc:  # e.g. q rounding a draw to 0: these values can't train, others can
        agent.mark(trial, "sweep_outcome", "error")
        trial.set_user_attr("error", str(exc)[:500])
        agent.study.tell(trial, state=TrialState.FAIL)
        say(f"trial {trial.number} failed: {exc}")
        return "failed", None
    attempt = agent.storage.get_trial(trial._trial_id).system_attrs.get("attempt", 1)
    earlier = _finished_run(agent.runs_root, trial, values, p.metric)
    if earlier is not None:
        run_id = earlier[0].run_id
    trial.set_user_attr("run_id", run_id)
    trial.set_user_attr("agent", agent.who)
    trial.set_user_attr("values", values)
    if earlier is not None:
        return _adopt(agent, trial, key, *earlier)
    resumed = _resume_from(trial, config, run_id, p.metric)
    shown = " ".join(f"{k}={v}" for k, v in values.items())
    say(f"trial {trial.number} ({key}, attempt {attempt}): {shown} -> W&B run {run_id}{resumed}")
    notes = f"Optuna trial {trial.number} of offline sweep {p.name} ({key}, attempt {attempt}){resumed}"
    # the run's own wandb.init arguments, not WANDB_* variables: W&B reads those once per process, and the
    # process (its W&B service, data, imports) stays warm for the next trial
    run_settings = {"group": p.name, "job_type": JOB_TYPE, "tags": [TAG], "name": f"{p.name}-{trial.number}",
                    "notes": notes, "symlink": False}  # symlink: no latest-run / debug.log links in the shared runs folder
    environ = {**agent.environ, "WANDB_MODE": "offline", "WANDB_RUN_ID": run_id}

    pruned = False

    def on_epoch(epoch: int, metrics: Mapping[str, float]) -> bool:
        """After each epoch: stop when another agent took the trial over, or Hyperband prunes it."""
        nonlocal pruned
        if beat.lost.is_set():
            return True
        if p.metric in metrics and p.spec.early_terminate:
            try:
                trial.report(float(metrics[p.metric]), epoch + 1)  # resource = epochs done (W&B's min_iter unit)
                pruned = trial.should_prune()
            except Exception as exc:
                problem = storage_problem(exc)
                if problem is None:
                    raise
                # the database went silent or away: like the heartbeat, training goes on (its checkpoints
                # stand); the agent ends once the trial is over if the database is still gone
                say(f"trial {trial.number}: epoch {epoch + 1} not reported, {storage_down(agent.storage)} "
                    f"({problem}); training goes on")
        return pruned

    started = time.monotonic()
    try:
        result = train(config, environ, on_epoch=on_epoch, run_settings=run_settings,
                       sweep_results=lambda: _completed(agent))
    except BaseException as exc:
        _after_run(agent, trial, run_id)
        # Preempted (SIGTERM/SIGINT, checkpoint written), or anything raised once a stop arrived: rerun at
        # once; a UserError is the setup, not the values: rerun later; anything else is this trial failing,
        # like a failed W&B run
        stopping = isinstance(exc, (Preempted, interrupts.Stopped)) or (isinstance(exc, Exception) and interrupts.requested() is not None)
        reason = ("preempted" if stopping else "interrupted" if isinstance(exc, UserError)
                  else "error" if isinstance(exc, Exception) else None)
        if reason is not None:
            with contextlib.suppress(UpdateFinishedTrialError):  # already failed by another agent
                agent.mark(trial, "sweep_outcome", reason)
                if reason == "error":
                    trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
                agent.study.tell(trial, state=TrialState.FAIL)
        raise
    _after_run(agent, trial, run_id)
    if beat.lost.is_set():
        raise Dropped("lost")
    seconds = time.monotonic() - started
    if result.get("diverged"):
        agent.mark(trial, "sweep_outcome", "diverged")  # shown as DIVERGED (app.sweep.optuna.trials)
        say(f"trial {trial.number} diverged: {result['diverged_at']}; recorded with {p.metric} {worst(p.goal)}, "
            f"the worst ({seconds:.0f} s)")
        return "diverged", worst(p.goal)
    value = result.get(p.metric)
    if value is None and not pruned:  # `loss` is in the run's summary only: read it back from the run log
        run = _read_run(agent.runs_root, run_id)
        value = run.summary.get(p.metric) if run is not None else None
    if pruned:
        say(f"trial {trial.number} pruned by hyperband ({seconds:.0f} s)")
        return "pruned", None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        agent.mark(trial, "sweep_outcome", "error")
        trial.set_user_attr("error", f"{p.metric} is {value} (diverged, or never logged)")
        agent.study.tell(trial, state=TrialState.FAIL)
        say(f"trial {trial.number} failed: {p.metric} is {value}")
        return "failed", None
    say(f"trial {trial.number} complete: {p.metric} {value:.4f} ({seconds:.0f} s)")
    return "complete", float(value)

def _after_run(agent, trial, run_id: str) -> None:
    """Make the run folder self-contained and note it in the trial, while the trial can still change;
    free what the run left on the GPU before the next one (and say what stays)."""
    folder = _run_folder(agent.runs_root, run_id)
    if folder is not None:
        tracking.materialize_links(folder)
        with contextlib.suppress(ValueError, UpdateFinishedTrialError):
            trial.set_user_attr("run_folder", str(folder.relative_to(agent.runs_root)))
    from app.train import release_device_memory

    held = release_device_memory()
    if held:
        say(held)


def _finished_run(root: Path, trial, values: dict, metric: str):
    """The W&B run of the attempt this retry repeats, when it ran to its end: its agent trained and
    finished it, then could not tell the sweep's database (gone at that moment) and the trial was
    handed out again. (run, its outcome, its metric); None when there is no such run to stand on."""
    old = trial.user_attrs.get("resume_run")
    if not isinstance(old, str) or not runid.valid(old):
        return None
    run = _read_run(root, old)
    if run is None or run.damaged or run.exit_code != 0 or run.preempting:
        return None
    if any(run.config.get(k) != v for k, v in values.items()):
        return None  # not this trial's values: never stand in for them
    if run.summary.get("pruned") is True:
        return run, "pruned", None
    if run.summary.get("diverged") is True:  # its summary's metric is an epoch's from before it diverged
        return run, "diverged", None
    value = run.summary.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return run, "complete", float(value)


def _adopt(agent, trial, key: str, run, outcome_: str, value: float | None) -> tuple[str, float | None]:
    """Record the earlier attempt's finished run as this trial's result: one finished run per grid point."""
    with contextlib.suppress(ValueError):
        trial.set_user_attr("run_folder", str(run.path.relative_to(agent.runs_root)))
    if outcome_ == "diverged":
        agent.mark(trial, "sweep_outcome", "diverged")
        value = worst(agent.p.goal)
    result = ("pruned by hyperband" if outcome_ == "pruned" else f"diverged ({run.summary.get('diverged_at')})"
              if outcome_ == "diverged" else f"{agent.p.metric} {value:.4f}")
    say(f"trial {trial.number} ({key}): W&B run {run.run_id} of the attempt before ran to its end ({result}) "
        "but was never recorded; recorded from it, not trained again")
    return outcome_, value


AFTER_TRAINING = ("test_loss", "test_accuracy")  # measured again by a run resumed after its last epoch


def _newest_checkpoint(trial, config: Config) -> tuple[str, Path] | None:
    """(run id, checkpoint) of the newest checkpoint any earlier attempt of the trial wrote: the attempt
    just before may have been stopped before it opened its run, with no checkpoint of its own."""
    runs = trial.user_attrs.get("resume_runs")
    olds = [trial.user_attrs.get("resume_run"), *(runs if isinstance(runs, list) else [])]
    # the ids come from the sweep's storage: one that is not a plain name is never joined to a path
    found = {old: Path(config.output_dir) / old / checkpoint.FILE for old in olds if isinstance(old, str) and runid.valid(old)}
    found = {old: src for old, src in found.items() if src.is_file()}
    if not found:
        return None
    return max(found.items(), key=lambda item: item[1].stat().st_mtime)


def _resume_from(trial, config: Config, run_id: str, metric: str) -> str:
    """A retry starts from the newest last-epoch checkpoint an earlier attempt left in the outputs folder."""
    newest = _newest_checkpoint(trial, config) if config.resume else None
    if newest is None:
        return ""
    old, src = newest
    try:
        done, last_val = checkpoint.epochs_done(src, config)
    except UserError as exc:  # damaged, or written on another device type: this attempt trains from the start
        say(f"trial {trial.number}: not resuming run {old}'s checkpoint, training from the start ({exc})")
        return ""
    if done >= config.epochs and metric not in last_val and metric not in AFTER_TRAINING:
        # stopped after its last epoch: train() goes straight to test and export and reports the last epoch's
        # val metrics from the checkpoint; one from before they were kept, or a metric measured while
        # training (loss, examples_per_s), has nothing to report: train this attempt from the start
        return ""
    dst = Path(config.output_dir) / run_id
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst / checkpoint.FILE)
    return f", resuming from run {old}'s checkpoint after epoch {done}"


def _read_run(root: Path, run_id: str):
    from app import runlog

    folder = _run_folder(root, run_id)
    if folder is None:
        return None
    try:
        return runlog.read(folder)
    except runlog.RunLogError:
        return None
