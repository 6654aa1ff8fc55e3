"""Which trial of an offline sweep may train: keys, outcomes, heartbeats and dead trials.

Every trial carries a key: its grid point (`grid-<id>`), or the trial that first drew its values
(`trial-<number>`); a retry keeps the key of the attempt it replaces. Trials are totally ordered by number
in both storages (journal: log order; PostgreSQL: Optuna locks the study row while numbering), so the
rule "train only when no trial with this key is finished and none with a lower number is queued or
running" lets exactly one of any set of concurrent duplicates train, whatever the timing.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from app.heartbeat import Heartbeat

STALE_BEATS = 4  # a trial is dead after this many heartbeat intervals without a beat
MAX_STALE = 3  # give a key up after this many dead attempts (something kills it: OOM, a bad node)


def key_of(t, grid: bool) -> str | None:
    """A trial's key: its grid point, or the trial that first drew its values. None: not known yet."""
    attrs = t.system_attrs
    if "sweep_key" in attrs:
        return attrs["sweep_key"]
    if "grid_id" in attrs:
        return f"grid-{attrs['grid_id']}"
    return None if grid else f"trial-{t.number}"


def outcome(t) -> str:
    """live | done | void (a duplicate or over the cap: never trained) | retry (died: run it again)."""
    if t.state in (TrialState.WAITING, TrialState.RUNNING):
        return "live"
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return "done"
    reason = t.system_attrs.get("sweep_outcome")
    if reason in ("duplicate", "capped"):
        return "void"
    if reason in ("stale", "preempted", "interrupted"):
        return "retry"
    return "done"  # the training raised (sweep_outcome=error): like W&B, a failed run is not rerun


@dataclass
class Ledger:
    trials: list
    grid: bool
    grid_size: int | None
    run_cap: int | None
    by_key: dict[str, list] = field(default_factory=dict)

    def __post_init__(self):
        for t in self.trials:
            k = key_of(t, self.grid)
            if k is not None:
                self.by_key.setdefault(k, []).append(t)

    def stale_count(self, key: str) -> int:
        return sum(1 for t in self.by_key.get(key, ()) if t.system_attrs.get("sweep_outcome") == "stale"
                   and outcome(t) == "retry")

    def done(self, key: str) -> bool:
        ts = self.by_key.get(key, ())
        return any(outcome(t) == "done" for t in ts) or self.stale_count(key) >= MAX_STALE

    def live(self, key: str) -> bool:
        return any(outcome(t) == "live" for t in self.by_key.get(key, ()))

    def counted(self, below: int | None = None) -> set[str]:
        """Keys that take a place under run_cap: any trial of theirs that wasn't void."""
        return {k for k, ts in self.by_key.items()
                if any(outcome(t) != "void" and (below is None or t.number < below) for t in ts)}

    def needs_retry(self) -> list[str]:
        """Keys to queue again: their last attempt died, or (grid) only duplicates that never trained hold them.

        GridSampler counts any finished trial as a visited point, so it won't pick those points itself.
        """
        out = []
        for k, ts in self.by_key.items():
            if self.done(k) or self.live(k):
                continue
            if any(outcome(t) == "retry" for t in ts) or (self.grid and not self.cap_reached()):
                out.append(k)
        return out

    def untouched_grid_keys(self) -> list[str]:
        if not self.grid:
            return []
        keys = (f"grid-{i}" for i in range(self.grid_size or 0))
        return [k for k in keys if all(outcome(t) == "void" for t in self.by_key.get(k, ()))]

    def cap_reached(self) -> bool:
        return self.run_cap is not None and len(self.counted()) >= self.run_cap

    def finished(self) -> bool:
        if self.cap_reached():
            return all(self.done(k) for k in self.counted())
        if self.grid:
            return all(self.done(f"grid-{i}") for i in range(self.grid_size or 0))
        return False  # random/bayes without run_cap run until stopped (AGENT_COUNT or a signal)

    def work_available(self) -> bool:
        if any(t.state == TrialState.WAITING for t in self.trials) or self.needs_retry():
            return True
        if self.cap_reached():
            return False
        return bool(self.untouched_grid_keys()) if self.grid else True

    def verdict(self, trial) -> str | None:
        """Why `trial` (just asked, ours) must not train, or None when it may."""
        key = key_of(trial, self.grid)
        others = [t for t in self.by_key.get(key, ()) if t.number != trial.number]
        if any(outcome(t) == "done" for t in others) or self.stale_count(key) >= MAX_STALE:
            return "duplicate"
        if any(outcome(t) == "live" and t.number < trial.number for t in others):
            return "duplicate"
        counted = self.counted(below=trial.number)
        if self.run_cap is not None and key not in counted and len(counted) >= self.run_cap:
            return "capped"
        return None


# --------------------------------------------------------------------------------------------
# Heartbeats and stale trials
# --------------------------------------------------------------------------------------------

class TrialHeartbeat(Heartbeat):
    """Writes the time into the trial every interval, from the start (StaleWatch reads it); notices when
    another agent has failed the trial."""

    def __init__(self, storage, trial_id: int, interval: float):
        super().__init__(f"heartbeat-{trial_id}", interval)
        self.storage, self.trial_id = storage, trial_id
        self.lost = threading.Event()
        self._failing = False  # in a storage outage: said once, not every beat

    def beat(self) -> bool:
        from app.sweep.optuna.storage import storage_down, storage_problem

        try:
            self.storage.set_trial_system_attr(self.trial_id, "heartbeat", time.time())
        except UpdateFinishedTrialError:
            self.lost.set()  # another agent declared this trial dead and failed it
            return False
        except Exception as exc:  # a storage hiccup: keep beating; a long outage looks like death
            problem = storage_problem(exc)
            if problem is None:
                print(f"heartbeat: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            elif not self._failing:
                print(f"heartbeat: {storage_down(self.storage)} ({problem}); training goes on",
                      file=sys.stderr, flush=True)
            self._failing = problem is not None
        else:
            if self._failing:
                print("heartbeat: the sweep storage works again", file=sys.stderr, flush=True)
            self._failing = False
        return True


class StaleWatch:
    """Finds RUNNING trials whose heartbeat hasn't changed for STALE_BEATS intervals of our clock."""

    def __init__(self, interval: float):
        self.grace = STALE_BEATS * interval
        self.seen: dict[int, tuple[Any, float]] = {}

    def stale(self, trials: Iterable, mine: set[int]) -> list:
        now = time.monotonic()
        out = []
        running = {t._trial_id: t for t in trials if t.state == TrialState.RUNNING and t._trial_id not in mine}
        for tid in list(self.seen):
            if tid not in running:
                del self.seen[tid]
        for tid, t in running.items():
            beat = t.system_attrs.get("heartbeat")
            last = self.seen.get(tid)
            if last is None or last[0] != beat:
                self.seen[tid] = (beat, now)
            elif now - last[1] > self.grace:
                out.append(t)
        return out
