"""The offline sweep agent: asks the study for a trial, trains it as an offline W&B run, tells the result.

    python -m app offline-agent --config sweeps/grid.yaml [--storage URL] [--count N]
    docker compose up agent --scale agent=3      (with SWEEP_CONFIG=/app/sweeps/grid.yaml, WANDB_MODE=offline)

Each trial is an offline W&B run grouped under the sweep's name, its values in the run's config;
`python -m app sync` uploads them later. run_cap -> at most that many distinct trials.

A killed agent (kill -9, OOM, a lost host) leaves its trial RUNNING. Every agent beats a heartbeat
into its trial's system attributes (SWEEP_HEARTBEAT_S, default 10 s); any other agent that sees a
trial's heartbeat unchanged for 4 intervals (measured on its own monotonic clock, so hosts' clocks
may disagree) fails it and queues a retry with the same values, which resumes from the dead run's
checkpoint when the outputs folder is shared. Optuna's own heartbeat exists only for RDBStorage; one
mechanism for both storages keeps the recovery path the same everywhere.

No grid point (or random/bayes trial) runs twice to completion: app.sweep.optuna.claims holds the rule and
why it holds. The W&B parameter forms map onto Optuna distributions in app.sweep.optuna.space; the storage
and the study are app.sweep.optuna.storage, the plan app.sweep.optuna.plan.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time
from typing import Any, Mapping

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from app import display, interrupts, settings
from app.errors import UserError
from app.sweep.optuna.claims import STALE_BEATS, Ledger, StaleWatch, TrialHeartbeat, key_of, outcome
from app.sweep.optuna.plan import Plan, plan, redact
from app.sweep.optuna.storage import hand_over, handed_over, open_storage, open_study, storage_problem, study_storage
from app.sweep.optuna.trial import Dropped, say, train_trial
from app.sweep.optuna.trials import TrialView, whole_trials

MAX_ERRORS_IN_A_ROW = 3  # an agent whose trials keep raising stops (like `wandb agent`)


def agent_name(environ: Mapping[str, str]) -> str:
    """host:pid, with the Slurm task between them when there is one (`node1:12_3:6`): agents in containers
    on one host (`--network host`: the host's name) all run as pid 6 or so; the pid stays last."""
    task = settings.get("SLURM_JOB_ID", environ)
    array, index = settings.get("SLURM_ARRAY_JOB_ID", environ), settings.get("SLURM_ARRAY_TASK_ID", environ)
    if array and index:
        task = f"{array}_{index}"
    return f"{socket.gethostname()}:{task + ':' if task else ''}{os.getpid()}"


class Agent:
    def __init__(self, p: Plan, environ: Mapping[str, str]):
        self.p = p
        self.environ = dict(environ)
        # the storage check_environment just opened: a journal is replayed whole on opening (seconds at 20 000 trials)
        self.storage = handed_over(p.storage_url) or open_storage(p.storage_url)
        self.study = open_study(p, study_storage(p, self.storage))
        self.view = TrialView(self.storage, self.study._study_id)
        self._ledger: Ledger | None = None
        self.watch = StaleWatch(p.heartbeat_s)
        self.who = agent_name(environ)
        self.mine: set[int] = set()
        self.current = None  # the trial this agent is running, if any
        self.runs_root = settings.runs_root(environ)

    def ledger(self) -> Ledger:
        """The sweep's ledger, brought up to date: only trials new or unfinished since the last look are read,
        so a trial costs the same in a sweep of 20 000 as in an empty one."""
        if self._ledger is None:
            self._ledger = Ledger((), self.p.spec.method == "grid", self.p.grid_size, self.p.spec.run_cap,
                                  maximize=self.p.goal == "maximize")
        self._ledger.update(self.view.changes())
        return self._ledger

    # --- housekeeping: fail dead trials, queue retries ---
    def fail_stale(self, ledger: Ledger) -> bool:
        failed = False
        for t in self.watch.stale(ledger.live_trials(), self.mine):
            try:
                self.storage.set_trial_system_attr(t._trial_id, "sweep_outcome", "stale")
                self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # it finished, or another agent failed it first
            failed = True
            say(f"trial {t.number} ({key_of(t, ledger.grid)}) stopped beating for {self.watch.grace:.0f} s "
                 f"(agent {t.user_attrs.get('agent', '?')} is gone): failed it, queueing a retry")
        return failed

    def queue_retries(self, ledger: Ledger) -> None:
        for key in ledger.needs_retry():
            # the ledger keeps a finished trial small: its attempts whole, for their values and runs
            attempts = whole_trials(self.storage, self.study._study_id, [t._trial_id for t in ledger.by_key[key].values()])
            last = attempts[-1]
            system = {"sweep_key": key, "retry_of": last.number,
                      "attempt": len([t for t in attempts if outcome(t) != "void"]) + 1}
            for k in ("grid_id", "search_space"):  # GridSampler then leaves the queued values alone
                if k in last.system_attrs:
                    system[k] = last.system_attrs[k]
            # every attempt's run, newest first: one stopped before it opened its run (or wrote a checkpoint)
            # must not hide the checkpoint of the attempt before it (trial._resume_from picks the newest)
            runs = [t.user_attrs["run_id"] for t in reversed(attempts) if "run_id" in t.user_attrs]
            user = {"resume_run": runs[0], "resume_runs": runs} if runs else {}
            self.study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=last.params, distributions=last.distributions,
                system_attrs=system, user_attrs=user))

    def mark(self, trial, key: str, value: Any) -> None:
        self.storage.set_trial_system_attr(trial._trial_id, key, value)

    # --- one trial ---
    def _settle(self, trial, grid: bool) -> Ledger:
        """Wait until every lower-numbered unfinished trial shows its key (a grid trial gets it just after creation)."""
        deadline = time.monotonic() + max(30.0, 2 * STALE_BEATS * self.p.heartbeat_s)
        while True:
            ledger = self.ledger()
            pending = ledger.pending_before(trial.number)
            if not pending or time.monotonic() > deadline:
                if pending:
                    raise Dropped("duplicate")  # can't prove it's unique: safer not to train
                return ledger
            time.sleep(0.2)

    def run_trial(self, trial) -> str:
        grid = self.p.spec.method == "grid"
        self.mine.add(trial._trial_id)
        beat = TrialHeartbeat(self.storage, trial._trial_id, self.p.heartbeat_s)
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
            self.mark(trial, "sweep_key", key)
            values = self.p.space.values(params)
            outcome_, value = train_trial(self, trial, key, values, beat)
        except interrupts.Stopped:  # stopped before training began: the values go out again
            with contextlib.suppress(UpdateFinishedTrialError):
                self.mark(trial, "sweep_outcome", "preempted")
                self.study.tell(trial, state=TrialState.FAIL)
            raise
        except Dropped as drop:
            reason = str(drop)
            with contextlib.suppress(UpdateFinishedTrialError):
                self.mark(trial, "sweep_outcome", reason)
                self.study.tell(trial, state=TrialState.FAIL)
            if reason == "lost":
                say(f"trial {trial.number} was declared dead by another agent and rerun there; dropped this result")
            elif reason != "capped":
                say(f"trial {trial.number}: {reason}, not trained")
            return reason
        finally:
            beat.stop()
            self.mine.discard(trial._trial_id)
        try:
            if outcome_ == "pruned":
                self.study.tell(trial, state=TrialState.PRUNED)
            elif outcome_ in ("complete", "diverged"):  # diverged: the metric's worst (trial.worst says why)
                self.study.tell(trial, value)
        except UpdateFinishedTrialError:
            say(f"trial {trial.number} was declared dead by another agent while finishing; its rerun counts")
            return "lost"
        return outcome_

    def run(self) -> int:
        p = self.p
        where = redact(p.storage_url)
        say(f"sweep {p.name}: {p.spec.method}, {p.goal} {p.metric}; storage {where}; agent {self.who}")
        unused = sorted(set(p.spec.early_terminate or ()) & {"s", "strict"})
        if unused:
            say(f"note: early_terminate {', '.join(unused)} not used: Optuna's Hyperband derives its brackets "
                 "from min_iter, max_iter (default: epochs) and eta")
        interrupts.clear()
        try:
            code = self._loop()
            self.say_best()
            return code
        except interrupts.Stopped as stop:  # between trials, or before one began training
            return self.stopped(stop.signum)
        except Exception as exc:
            problem = storage_problem(exc)
            if problem is None:
                raise
            if interrupts.requested() is not None:  # a stop is a stop, even with the database gone too
                return self.stopped(interrupts.requested(), self.current)
            return self.storage_lost(problem)

    def say_best(self) -> None:
        """The sweep's best trial so far, in one line, as the agent ends (sweep-status has its command)."""
        try:
            best = self.ledger().best  # a diverged trial's inf is no best
            best = best if best is None else self.storage.get_trial(best._trial_id)
        except Exception:  # a last look: the storage going away now changes nothing already recorded
            return
        if best is None:
            say(f"sweep {self.p.name}: no trial has completed with a value of {self.p.metric} yet")
            return
        shown = " ".join(f"{k}={display.text(v)}" for k, v in (best.user_attrs.get("values") or best.params).items())
        say(f"best so far: trial {best.number}, {self.p.metric} {best.value:.4f} ({shown}; W&B run "
            f"{best.user_attrs.get('run_id', '-')}); `python -m app sweep-status` shows how to train it again")

    def storage_lost(self, problem: str) -> int:
        """The database went silent or away, or the journal can no longer be written (a full or read-only
        volume), mid-sweep: nothing more can be recorded, so stop. A trial left RUNNING there keeps its
        checkpoint; once the storage works again, an agent sees its heartbeat stop and hands it out again
        (resuming the checkpoint, or recording its run if that ran to its end)."""
        trial = self.current
        url = self.p.storage_url
        if "://" in url:
            where, what, back = f"SWEEP_STORAGE={redact(url)}", "the database stopped answering", "the database answers"
            again = "when it is back"
        else:
            where, what, back = f"sweep storage {url[:160]}", "the journal could not be written", "it can be written"
            again = "once it can (free space on its volume, or make it writable)"
        left = (f"trial {trial.number} stays RUNNING there and is handed out again (from its checkpoint) once "
                f"{back}; " if trial is not None else "")
        print(f"error: {where}: {what} ({problem}); {left}start the agents again {again}", file=sys.stderr, flush=True)
        return 1

    def stopped(self, signum: int, trial=None) -> int:
        """After a stop signal: no new trial; the stopped one (checkpointed) is handed out again."""
        code = 128 + signum
        what = f"trial {trial.number} checkpointed and handed back for a retry; " if trial is not None else ""
        say(f"agent stopped by {signal.Signals(signum).name}: {what}no new trial taken; exit {code}")
        return code

    def _loop(self) -> int:
        from app.train import Preempted

        p = self.p
        trained = errors_in_a_row = 0
        waiting_said = False
        while p.count is None or trained < p.count:
            if interrupts.requested() is not None:
                return self.stopped(interrupts.requested())
            ledger = self.ledger()
            if self.fail_stale(ledger):
                ledger = self.ledger()
            self.queue_retries(ledger)
            if ledger.finished():
                say(f"sweep {p.name} is done ({len(ledger.counted())} trials); agent exits")
                break
            if not ledger.work_available():
                running = len(ledger.live_trials())
                if not waiting_said:
                    say(f"nothing to start; waiting for {running} trial(s) running on other agents")
                    waiting_said = True
                time.sleep(min(p.heartbeat_s, 5.0))
                continue
            waiting_said = False
            trial = self.current = self.study.ask()
            try:
                result = self.run_trial(trial)
            except (Preempted, interrupts.Stopped) as stop:
                return self.stopped(stop.signum, trial)
            except UpdateFinishedTrialError:
                self.current = None
                say(f"trial {trial.number} was declared dead by another agent; its rerun counts")
                continue
            except UserError:
                raise
            except Exception as exc:
                if interrupts.requested() is not None:  # a failure caused by the stop (recorded as one)
                    say(f"trial {trial.number} ended by the stop: {type(exc).__name__}: {exc}")
                    return self.stopped(interrupts.requested(), trial)
                if storage_problem(exc) is not None:
                    raise  # not this trial failing: nothing can be recorded any more (see run)
                self.current = None
                errors_in_a_row += 1
                say(f"trial {trial.number} failed: {type(exc).__name__}: {exc}")
                if errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
                    say(f"{errors_in_a_row} trials in a row failed; stopping this agent")
                    return 1
                trained += 1
                continue
            self.current = None
            if result == "capped":
                continue  # the loop sees cap_reached next time round
            # diverged: a finished trial (its values' result), no failure; failed: the metric came out NaN
            if result in ("complete", "pruned", "diverged", "failed"):
                if result != "failed":
                    errors_in_a_row = 0
                trained += 1
        else:
            say(f"ran {trained} trial(s) (AGENT_COUNT); agent exits")
        return 0


def check_environment(environ: Mapping[str, str], p: Plan | None = None) -> Plan:
    """Every problem an offline sweep can find before training, as one UserError line; `p`: the plan
    of `environ` when the caller has already read it."""
    p = p or plan(environ)
    storage = open_storage(p.storage_url)
    open_study(p, storage)  # reaches the storage; a wrong URL, password or a changed sweep fails here
    hand_over(p.storage_url, storage)  # to the Agent that follows: a journal is read once, not twice
    return p


def run_agent(environ: Mapping[str, str], p: Plan | None = None) -> int:
    try:
        return Agent(p or plan(environ), environ).run()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C between trials: nothing is running, nothing to save
        return 130


def _environ_with(args: argparse.Namespace) -> dict[str, str]:
    from app import sources

    # into os.environ, as before: W&B reads its WANDB_* settings there in this process's trials
    sources.apply_dotenv(os.environ)  # WANDB_* and training settings in .env apply; the environment wins
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
    return run_agent(environ, check_environment(environ))
