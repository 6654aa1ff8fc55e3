"""Sweeps with no W&B server: the same `sweeps/*.yaml`, run by Optuna, each trial an offline W&B run.

    python -m app offline-agent --config sweeps/grid.yaml [--storage URL] [--count N]
    python -m app sweep-status [--config sweeps/grid.yaml | --name NAME] [--storage URL]
    docker compose up agent --scale agent=3      (with SWEEP_CONFIG=/app/sweeps/grid.yaml, WANDB_MODE=offline)

Mapping: grid -> GridSampler, random -> RandomSampler, bayes -> TPESampler, early_terminate hyperband ->
HyperbandPruner, metric.goal -> study direction, run_cap -> at most that many distinct trials. Each trial
is an offline W&B run grouped under the sweep's name, its values in the run's config; `python -m app
sync` uploads them later.

Storage (SWEEP_STORAGE): by default an Optuna journal file on the runs volume,
$WANDB_DIR/sweeps/<name>.journal. Optuna's JournalFileBackend is built for several processes sharing a
file system: every change is one appended line written under an O_EXCL lock file, and readers replay
the log, so the order of the log decides every race (two agents popping the same queued trial: the
first line wins). It needs no fcntl locks (unreliable on Docker Desktop file shares and NFS, which is
what SQLite depends on), and Optuna's RDBStorage on SQLite does not lock rows, so two agents can pop
the same trial there. For agents on several hosts: SWEEP_STORAGE=postgresql://user:pass@host/db
(RDBStorage; rows are locked FOR UPDATE).

A killed agent (kill -9, OOM, a lost host) leaves its trial RUNNING. Every agent beats a heartbeat
into its trial's system attributes (SWEEP_HEARTBEAT_S, default 10 s); any other agent that sees a
trial's heartbeat unchanged for 4 intervals (measured on its own monotonic clock, so hosts' clocks
may disagree) fails it and queues a retry with the same values, which resumes from the dead run's
checkpoint when the outputs folder is shared. Optuna's own heartbeat exists only for RDBStorage; one
mechanism for both storages keeps the recovery path the same everywhere.

No grid point (or random/bayes trial) runs twice to completion: app.sweep_ledger holds the rule and
why it holds. The W&B parameter forms map onto Optuna distributions in app.sweep_space.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from app import tracking
from app.config import Config, ConfigError
from app.config import load as load_config
from app.errors import UserError
from app.sweep import spec as sweep_spec
from app.sweep.ledger import STALE_BEATS, Heartbeat, Ledger, StaleWatch, key_of, outcome
from app.sweep.space import SearchSpace, search_space
from app.sweep.spec import SweepSpec, SweepSpecError

HEARTBEAT_S = 10.0  # default seconds between heartbeats (SWEEP_HEARTBEAT_S)
MAX_ERRORS_IN_A_ROW = 3  # an agent whose trials keep raising stops (like `wandb agent`)
JOB_TYPE = "sweep-trial"
TAG = "offline-sweep"


# --------------------------------------------------------------------------------------------
# The plan: everything an agent needs, checked before any work
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    spec: SweepSpec
    name: str  # study name, W&B group
    space: SearchSpace
    storage_url: str  # a journal file path, or a postgresql:// URL
    count: int | None  # trials this agent runs; None = until the sweep is done
    heartbeat_s: float
    base: Config  # the training config from .env / environment, before the trial's values
    metric: str
    goal: str

    @property
    def grid_size(self) -> int | None:
        if self.spec.method != "grid":
            return None
        return math.prod(len(d.distribution.choices) for d in self.space.dimensions)


def _name(spec: SweepSpec, path: str) -> str:
    raw = spec.name or Path(path).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-.") or "sweep"


def redact(url: str) -> str:
    """A storage URL with its password replaced, for messages and logs."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def storage_url(environ: Mapping[str, str], name: str) -> str:
    url = environ.get("SWEEP_STORAGE", "").strip()
    if not url:
        return str(tracking.runs_root(environ) / "sweeps" / f"{name}.journal")
    if "://" not in url:
        return url  # a journal file path
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("sqlite"):
        raise UserError("SWEEP_STORAGE=sqlite:... is not safe with several agents (Optuna's SQLite storage does not lock "
                        "the trial it pops); leave SWEEP_STORAGE unset for the journal file on the runs volume")
    if scheme not in ("postgresql", "postgresql+psycopg2", "postgres"):
        raise UserError(f"SWEEP_STORAGE={redact(url)!r}: use a postgresql://user:password@host/db URL, "
                        "or a journal file path (unset = $WANDB_DIR/sweeps/<name>.journal)")
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver installed here is psycopg2
    return "postgresql+psycopg2" + url[len(scheme):]


def _positive(environ: Mapping[str, str], key: str, kind=int):
    text = environ.get(key, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise UserError(f"{key}={text!r} must be a positive {'integer' if kind is int else 'number'}")
    return value


def plan(environ: Mapping[str, str]) -> Plan:
    path = environ.get("SWEEP_CONFIG", "").strip()
    if not path:
        raise UserError("an offline sweep needs SWEEP_CONFIG: the path of a sweep YAML such as sweeps/grid.yaml")
    mode = environ.get("WANDB_MODE", "").strip().lower()
    if mode not in ("", "offline", "dryrun"):
        raise UserError(f"WANDB_MODE={mode}: an offline sweep records every trial as an offline W&B run; "
                        "unset WANDB_MODE or set it to offline (upload later with: python -m app sync)")
    spec = sweep_spec.load(path)
    space = search_space(spec)
    name = _name(spec, path)
    base = load_config(environ=environ, dotenv_path=None)
    try:
        base.replace(**space.constants)
    except ConfigError as exc:
        raise SweepSpecError(f"{path}: {exc}") from None
    return Plan(
        spec=spec, name=name, space=space, storage_url=storage_url(environ, name),
        count=_positive(environ, "AGENT_COUNT"),
        heartbeat_s=_positive(environ, "SWEEP_HEARTBEAT_S", float) or HEARTBEAT_S,
        base=base,
        # W&B lets grid and random sweeps omit the metric; Optuna needs a value, so record val_loss
        metric=spec.metric or "val_loss",
        goal=spec.goal if spec.metric else "minimize",
    )


# --------------------------------------------------------------------------------------------
# Storage and study
# --------------------------------------------------------------------------------------------

def open_storage(url: str):
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # agents print their own one-line records

    if "://" in url:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as exc:  # sqlalchemy/psycopg2 errors: bad host, password, database
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"SWEEP_STORAGE={redact(url)}: cannot open the database ({redact(first)})") from None

    path = Path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except OSError as exc:
        raise UserError(f"sweep storage {str(path)!r} is not writable ({exc.strerror or exc}); "
                        "check the runs volume or set SWEEP_STORAGE") from None


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its end-of-grid `study.stop()`, which works only inside
    `study.optimize`: these agents use ask/tell and decide themselves when the sweep is over (they
    must also wait for trials running elsewhere)."""

    def after_trial(self, study, trial, state, values):
        pass


def sampler(p: Plan):
    if p.spec.method == "grid":
        return GridSampler(p.space.grid_space(), seed=0)
    if p.spec.method == "random":
        return optuna.samplers.RandomSampler()
    return optuna.samplers.TPESampler()


def pruner(p: Plan):
    """W&B's hyperband settings as Optuna's HyperbandPruner; one resource unit = one epoch."""
    et = p.spec.early_terminate
    if not et:
        return optuna.pruners.NopPruner()
    epochs = p.space.constants.get("epochs")
    swept_epochs = any(d.name == "epochs" for d in p.space.dimensions)
    max_resource = et.get("max_iter") or ("auto" if swept_epochs else int(epochs or p.base.epochs))
    return optuna.pruners.HyperbandPruner(min_resource=et.get("min_iter", 1), max_resource=max_resource,
                                          reduction_factor=et.get("eta", 3))


def _fingerprint(spec: SweepSpec) -> str:
    keys = ("method", "metric", "parameters", "early_terminate", "run_cap")
    return json.dumps({k: spec.raw.get(k) for k in keys}, sort_keys=True, default=str)


def open_study(p: Plan, storage=None):
    storage = storage if storage is not None else open_storage(p.storage_url)
    study = optuna.create_study(study_name=p.name, storage=storage, load_if_exists=True,
                                direction="maximize" if p.goal == "maximize" else "minimize",
                                sampler=sampler(p), pruner=pruner(p))
    fingerprint = _fingerprint(p.spec)
    stored = study.user_attrs.get("sweep_config")
    if stored is None:
        study.set_user_attr("sweep_config", fingerprint)
        study.set_user_attr("method", p.spec.method)
        study.set_user_attr("metric", p.metric)
        study.set_user_attr("goal", p.goal)
        if p.grid_size:
            study.set_user_attr("grid_size", p.grid_size)
    elif stored != fingerprint:
        raise UserError(f"sweep {p.name!r} in {redact(p.storage_url)} was started from a different config "
                        "(method, metric, parameters, early_terminate or run_cap changed); give the sweep a new "
                        "name: in the YAML, or remove that storage to start over")
    return study


# --------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------

class Dropped(Exception):
    """This trial must not train (a duplicate, over the cap, or taken over by another agent)."""


def _say(msg: str) -> None:
    print(f"[offline-sweep] {msg}", flush=True)


def _run_folder(root: Path, run_id: str) -> Path | None:
    found = sorted((root / "wandb").glob(f"*run-*-{run_id}"))
    return found[-1] if found else None


@contextlib.contextmanager
def _wandb_environment(values: Mapping[str, str]):
    """W&B reads these once per process: set them for one trial, and tear W&B down after it."""
    try:
        with tracking.environment(**values):
            yield
    finally:
        import wandb

        wandb.teardown()  # the next trial's wandb.init starts fresh and reads the new group/tags


class Agent:
    def __init__(self, p: Plan, environ: Mapping[str, str]):
        self.p = p
        self.environ = dict(environ)
        self.storage = open_storage(p.storage_url)
        self.study = open_study(p, self.storage)
        self.watch = StaleWatch(p.heartbeat_s)
        self.who = f"{socket.gethostname()}:{os.getpid()}"
        self.mine: set[int] = set()
        self.runs_root = tracking.runs_root(environ)

    def ledger(self) -> Ledger:
        trials = self.study.get_trials(deepcopy=False)
        return Ledger(trials, self.p.spec.method == "grid", self.p.grid_size, self.p.spec.run_cap)

    # --- housekeeping: fail dead trials, queue retries ---
    def fail_stale(self, ledger: Ledger) -> bool:
        failed = False
        for t in self.watch.stale(ledger.trials, self.mine):
            try:
                self.storage.set_trial_system_attr(t._trial_id, "sweep_outcome", "stale")
                self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # it finished, or another agent failed it first
            failed = True
            _say(f"trial {t.number} ({key_of(t, ledger.grid)}) stopped beating for {self.watch.grace:.0f} s "
                 f"(agent {t.user_attrs.get('agent', '?')} is gone): failed it, queueing a retry")
        return failed

    def queue_retries(self, ledger: Ledger) -> None:
        for key in ledger.needs_retry():
            last = max(ledger.by_key[key], key=lambda t: t.number)
            system = {"sweep_key": key, "retry_of": last.number,
                      "attempt": len([t for t in ledger.by_key[key] if outcome(t) != "void"]) + 1}
            for k in ("grid_id", "search_space"):  # GridSampler then leaves the queued values alone
                if k in last.system_attrs:
                    system[k] = last.system_attrs[k]
            user = {"resume_run": last.user_attrs["run_id"]} if "run_id" in last.user_attrs else {}
            self.study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=last.params, distributions=last.distributions,
                system_attrs=system, user_attrs=user))

    def _mark(self, trial, key: str, value: Any) -> None:
        self.storage.set_trial_system_attr(trial._trial_id, key, value)

    # --- one trial ---
    def _settle(self, trial, grid: bool) -> Ledger:
        """Wait until every lower-numbered unfinished trial shows its key (a grid trial gets it just after creation)."""
        deadline = time.monotonic() + max(30.0, 2 * STALE_BEATS * self.p.heartbeat_s)
        while True:
            ledger = self.ledger()
            pending = [t for t in ledger.trials if t.number < trial.number and outcome(t) == "live"
                       and key_of(t, grid) is None]
            if not pending or time.monotonic() > deadline:
                if pending:
                    raise Dropped("duplicate")  # can't prove it's unique: safer not to train
                return ledger
            time.sleep(0.2)

    def run_trial(self, trial) -> str:
        grid = self.p.spec.method == "grid"
        self.mine.add(trial._trial_id)
        beat = Heartbeat(self.storage, trial._trial_id, self.p.heartbeat_s)
        beat.start()
        try:
            params = {d.name: d.suggest(trial) for d in self.p.space.dimensions}
            key = key_of(self.storage.get_trial(trial._trial_id), grid)
            if key is None:
                raise Dropped("duplicate")  # a grid trial without a grid point (not expected): never train it
            ledger = self._settle(trial, grid)
            reason = ledger.verdict(self.storage.get_trial(trial._trial_id))
            if reason:
                raise Dropped(reason)
            self._mark(trial, "sweep_key", key)
            values = self.p.space.values(params)
            outcome_, value = self._train(trial, key, values, beat)
        except Dropped as drop:
            reason = str(drop)
            with contextlib.suppress(UpdateFinishedTrialError):
                self._mark(trial, "sweep_outcome", reason)
                self.study.tell(trial, state=TrialState.FAIL)
            if reason == "lost":
                _say(f"trial {trial.number} was declared dead by another agent and rerun there; dropped this result")
            elif reason != "capped":
                _say(f"trial {trial.number}: {reason}, not trained")
            return reason
        finally:
            beat.stop()
            self.mine.discard(trial._trial_id)
        try:
            if outcome_ == "pruned":
                self.study.tell(trial, state=TrialState.PRUNED)
            elif outcome_ == "complete":
                self.study.tell(trial, value)
        except UpdateFinishedTrialError:
            _say(f"trial {trial.number} was declared dead by another agent while finishing; its rerun counts")
            return "lost"
        return outcome_

    def _train(self, trial, key: str, values: dict, beat: Heartbeat) -> tuple[str, float | None]:
        from app.train import Preempted, train

        p = self.p
        run_id = tracking.new_run_id()
        try:
            config = p.base.replace(**values)
        except ConfigError as exc:  # e.g. q rounding a draw to 0: these values can't train, others can
            self._mark(trial, "sweep_outcome", "error")
            trial.set_user_attr("error", str(exc)[:500])
            self.study.tell(trial, state=TrialState.FAIL)
            _say(f"trial {trial.number} failed: {exc}")
            return "failed", None
        attempt = self.storage.get_trial(trial._trial_id).system_attrs.get("attempt", 1)
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("agent", self.who)
        trial.set_user_attr("values", values)
        resumed = self._resume_from(trial, config, run_id)
        shown = " ".join(f"{k}={v}" for k, v in values.items())
        _say(f"trial {trial.number} ({key}, attempt {attempt}): {shown} -> W&B run {run_id}{resumed}")
        notes = f"Optuna trial {trial.number} of offline sweep {p.name} ({key}, attempt {attempt}){resumed}"
        wandb_env = {"WANDB_RUN_GROUP": p.name, "WANDB_JOB_TYPE": JOB_TYPE, "WANDB_TAGS": TAG,
                     "WANDB_NAME": f"{p.name}-{trial.number}", "WANDB_NOTES": notes,
                     "WANDB_SYMLINK": "false"}  # no latest-run / debug.log links in the shared runs folder
        environ = {**self.environ, "WANDB_MODE": "offline", "WANDB_RUN_ID": run_id}

        pruned = False

        def on_epoch(epoch: int, metrics: Mapping[str, float]) -> bool:
            """After each epoch: stop when another agent took the trial over, or Hyperband prunes it."""
            nonlocal pruned
            if beat.lost.is_set():
                return True
            if p.metric in metrics and p.spec.early_terminate:
                trial.report(float(metrics[p.metric]), epoch + 1)  # resource = epochs done (W&B's min_iter unit)
                pruned = trial.should_prune()
            return pruned

        started = time.monotonic()
        try:
            with _wandb_environment(wandb_env):
                result = train(config, environ, on_epoch=on_epoch)
        except BaseException as exc:
            self._after_run(trial, run_id)
            # Preempted (SIGTERM/SIGINT, checkpoint written): rerun at once; a UserError is the setup, not the
            # values: rerun later; anything else is this trial failing, like a failed W&B run
            reason = ("preempted" if isinstance(exc, Preempted) else "interrupted" if isinstance(exc, UserError)
                      else "error" if isinstance(exc, Exception) else None)
            if reason is not None:
                with contextlib.suppress(UpdateFinishedTrialError):  # already failed by another agent
                    self._mark(trial, "sweep_outcome", reason)
                    if reason == "error":
                        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
                    self.study.tell(trial, state=TrialState.FAIL)
            raise
        self._after_run(trial, run_id)
        if beat.lost.is_set():
            raise Dropped("lost")
        value = result.get(p.metric)
        if value is None and not pruned:  # `loss` is in the run's summary only: read it back from the run log
            run = _read_run(self.runs_root, run_id)
            value = run.summary.get(p.metric) if run is not None else None
        seconds = time.monotonic() - started
        if pruned:
            _say(f"trial {trial.number} pruned by hyperband ({seconds:.0f} s)")
            return "pruned", None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            self._mark(trial, "sweep_outcome", "error")
            trial.set_user_attr("error", f"{p.metric} is {value} (diverged, or never logged)")
            self.study.tell(trial, state=TrialState.FAIL)
            _say(f"trial {trial.number} failed: {p.metric} is {value}")
            return "failed", None
        _say(f"trial {trial.number} complete: {p.metric} {value:.4f} ({seconds:.0f} s)")
        return "complete", float(value)

    def _after_run(self, trial, run_id: str) -> None:
        """Make the run folder self-contained and note it in the trial, while the trial can still change."""
        folder = _run_folder(self.runs_root, run_id)
        if folder is not None:
            tracking.materialize_links(folder)
            with contextlib.suppress(ValueError, UpdateFinishedTrialError):
                trial.set_user_attr("run_folder", str(folder.relative_to(self.runs_root)))

    def _resume_from(self, trial, config: Config, run_id: str) -> str:
        """A retry starts from the dead attempt's last epoch checkpoint when the outputs folder has it."""
        old = trial.user_attrs.get("resume_run")
        if not old or not config.resume:
            return ""
        src = Path(config.output_dir) / old / "checkpoint.pt"
        if not src.is_file():
            return ""
        import torch

        done = torch.load(src, map_location="cpu", weights_only=False).get("epoch", 0)
        if done >= config.epochs:
            # killed after its last epoch: train() would skip straight to test with no val metric to report
            return ""
        dst = Path(config.output_dir) / run_id
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / "checkpoint.pt")
        return f", resuming from run {old}'s checkpoint after epoch {done}"

    # --- the loop ---
    def run(self) -> int:
        from app.train import Preempted

        p = self.p
        where = redact(p.storage_url)
        _say(f"sweep {p.name}: {p.spec.method}, {p.goal} {p.metric}; storage {where}; agent {self.who}")
        unused = sorted(set(p.spec.early_terminate or ()) & {"s", "strict"})
        if unused:
            _say(f"note: early_terminate {', '.join(unused)} not used: Optuna's Hyperband derives its brackets "
                 "from min_iter, max_iter (default: epochs) and eta")
        trained = errors_in_a_row = 0
        waiting_said = False
        while p.count is None or trained < p.count:
            ledger = self.ledger()
            if self.fail_stale(ledger):
                ledger = self.ledger()
            self.queue_retries(ledger)
            if ledger.finished():
                _say(f"sweep {p.name} is done ({len(ledger.counted())} trials); agent exits")
                break
            if not ledger.work_available():
                running = sum(1 for t in ledger.trials if outcome(t) == "live")
                if not waiting_said:
                    _say(f"nothing to start; waiting for {running} trial(s) running on other agents")
                    waiting_said = True
                time.sleep(min(p.heartbeat_s, 5.0))
                continue
            waiting_said = False
            trial = self.study.ask()
            try:
                result = self.run_trial(trial)
            except Preempted as stop:
                _say(f"trial {trial.number} stopped by {stop}; checkpoint kept, another agent will resume it")
                return 128 + stop.signum
            except UpdateFinishedTrialError:
                _say(f"trial {trial.number} was declared dead by another agent; its rerun counts")
                continue
            except UserError:
                raise
            except Exception as exc:
                errors_in_a_row += 1
                _say(f"trial {trial.number} failed: {type(exc).__name__}: {exc}")
                if errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
                    _say(f"{errors_in_a_row} trials in a row failed; stopping this agent")
                    return 1
                trained += 1
                continue
            if result == "capped":
                continue  # the loop sees cap_reached next time round
            if result in ("complete", "pruned", "failed"):  # failed: the metric came out NaN (diverged)
                if result != "failed":
                    errors_in_a_row = 0
                trained += 1
        else:
            _say(f"ran {trained} trial(s) (AGENT_COUNT); agent exits")
        return 0


def _read_run(root: Path, run_id: str):
    from app import runlog

    folder = _run_folder(root, run_id)
    if folder is None:
        return None
    try:
        return runlog.read(folder)
    except runlog.RunLogError:
        return None


def check_environment(environ: Mapping[str, str]) -> None:
    """Every problem an offline sweep can find before training, as one UserError line."""
    p = plan(environ)
    open_study(p)  # reaches the storage; a wrong URL, password or a changed sweep fails here


def run_agent(environ: Mapping[str, str]) -> int:
    try:
        return Agent(plan(environ), environ).run()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C between trials: nothing is running, nothing to save
        return 130


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _environ_with(args: argparse.Namespace) -> dict[str, str]:
    from dotenv import load_dotenv

    load_dotenv(".env", override=False)  # WANDB_* and training settings in .env apply; the environment wins
    environ = dict(os.environ)
    for key, value in (("SWEEP_CONFIG", getattr(args, "config", None)), ("SWEEP_STORAGE", args.storage),
                       ("AGENT_COUNT", getattr(args, "count", None))):
        if value is not None:
            environ[key] = str(value)
    return environ


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app offline-agent",
        description="Run trials of a sweep YAML with no W&B server (Optuna); each trial is an offline W&B run. "
                    "Start several agents on the same storage to share the work.")
    parser.add_argument("--config", help="sweep YAML (default: $SWEEP_CONFIG)")
    parser.add_argument("--storage", help="journal file path or postgresql:// URL "
                                          "(default: $SWEEP_STORAGE, else $WANDB_DIR/sweeps/<name>.journal)")
    parser.add_argument("--count", type=int, help="trials for this agent, then exit (default: $AGENT_COUNT, else until done)")
    args = parser.parse_args(argv)
    environ = _environ_with(args)
    check_environment(environ)
    return run_agent(environ)


# --- sweep-status ---

def trial_rows(study, space: SearchSpace | None = None) -> list[dict[str, Any]]:
    """One row per trial that trained or is queued (duplicates never trained are left out)."""
    grid = study.user_attrs.get("method") == "grid"
    rows = []
    for t in study.get_trials(deepcopy=False):
        if outcome(t) == "void":
            continue
        values = t.user_attrs.get("values")
        if values is None:
            values = space.values(t.params) if space else dict(t.params)
        state = t.state.name
        if state == "FAIL":
            state = {"stale": "DIED", "preempted": "STOPPED", "interrupted": "STOPPED"}.get(
                t.system_attrs.get("sweep_outcome"), "FAIL")
        rows.append({"trial": t.number, "state": state, "key": key_of(t, grid) or "", "values": values,
                     "value": t.value, "run": t.user_attrs.get("run_id", ""),
                     "attempt": t.system_attrs.get("attempt", 1), "agent": t.user_attrs.get("agent", ""),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None,
                     "run_folder": t.user_attrs.get("run_folder", "")})
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def format_status(study) -> str:
    metric = study.user_attrs.get("metric", "value")
    goal = study.user_attrs.get("goal", "minimize")
    rows = trial_rows(study)
    names = sorted({k for r in rows for k in r["values"]})
    header = ["trial", "state", *names, metric, "run", "attempt", "seconds", "agent"]
    table = [[str(r["trial"]), r["state"], *[_fmt(r["values"].get(n)) for n in names], _fmt(r["value"]),
              r["run"] or "-", str(r["attempt"]), _fmt(r["seconds"]), r["agent"] or "-"] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    lines = [f"sweep {study.study_name}: {study.user_attrs.get('method', '?')}, {goal} {metric}"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    states = [r["state"] for r in rows]
    summary = ", ".join(f"{states.count(s)} {s.lower()}" for s in dict.fromkeys(states)) or "no trials yet"
    size = study.user_attrs.get("grid_size")
    done_points = len({r["key"] for r in rows if r["state"] in ("COMPLETE", "PRUNED")})
    lines.append(summary + (f"; {done_points} of {size} grid points done" if size else ""))
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    if complete:
        best = (max if goal == "maximize" else min)(complete, key=lambda r: r["value"])
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in best["values"].items())
        lines.append(f"best: trial {best['trial']} {metric} {best['value']:.4f}  {shown}  (W&B run {best['run']})")
    else:
        lines.append("best: none complete yet")
    return "\n".join(lines)


def find_studies(environ: Mapping[str, str], config: str | None, name: str | None, storage: str | None):
    """(storage url, study name) pairs that sweep-status should show."""
    if config:
        p_name = _name(sweep_spec.load(config), config)
        return [(storage_url({**environ, "SWEEP_STORAGE": storage or environ.get("SWEEP_STORAGE", "")}, p_name), p_name)]
    if storage or environ.get("SWEEP_STORAGE", "").strip():
        url = storage_url({**environ, "SWEEP_STORAGE": storage or environ["SWEEP_STORAGE"]}, "x")
        if name:
            return [(url, name)]

        return [(url, s.study_name) for s in optuna.get_all_study_summaries(open_storage(url), include_best_trial=False)]
    folder = tracking.runs_root(environ) / "sweeps"
    if name:
        return [(str(folder / f"{name}.journal"), name)]
    return [(str(f), f.stem) for f in sorted(folder.glob("*.journal"))]


def status_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app sweep-status",
                                     description="The trials table and the best trial of offline sweeps.")
    parser.add_argument("path", nargs="?", help="runs folder holding sweeps/*.journal (default: $WANDB_DIR, else .)")
    parser.add_argument("--config", help="the sweep YAML (its name: picks the study)")
    parser.add_argument("--name", help="the sweep name (default: every sweep in the storage)")
    parser.add_argument("--storage", help="journal file or postgresql:// URL (default: $SWEEP_STORAGE, "
                                          "else every $WANDB_DIR/sweeps/*.journal)")
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    environ = {**os.environ, **({"WANDB_DIR": args.path} if args.path else {})}
    found = find_studies(environ, args.config, args.name, args.storage)
    if not found:
        raise UserError(f"no offline sweep found under {tracking.runs_root(environ) / 'sweeps'}; "
                        "pass the runs folder, --config, --name or --storage")
    for i, (url, study_name) in enumerate(found):
        if "://" not in url and not Path(url).is_file():
            raise UserError(f"no offline sweep storage at {url!r}; has an agent run yet?")
        try:
            study = optuna.load_study(study_name=study_name, storage=open_storage(url))
        except KeyError:
            raise UserError(f"sweep {study_name!r} is not in {redact(url)}") from None
        if i:
            print()
        print(format_status(study))
    return 0
