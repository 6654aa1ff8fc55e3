"""Which trial of an offline sweep may train: keys, outcomes, heartbeats and dead trials.

Every trial carries a key: its grid point (`grid-<id>`), or the trial that first drew its values
(`trial-<number>`); a retry keeps the key of the attempt it replaces. Trials are totally ordered by number
in both storages (journal: log order; PostgreSQL: Optuna locks the study row while numbering), so the
rule "train only when no trial with this key is finished and none with a lower number is queued or
running" lets exactly one of any set of concurrent duplicates train, whatever the timing.
"""

from __future__ import annotations

import math
import sys
import threading
import time
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


class Ledger:
    """Every trial's key and outcome, kept up to date one changed trial at a time (`update`): what an agent
    asks before each trial costs the same in a sweep of 20 000 trials as in an empty one. A trial here is
    an Optuna FrozenTrial or anything with its number, _trial_id, state, value and system_attrs
    (app.sweep.optuna.trials.Seen)."""

    def __init__(self, trials: Iterable, grid: bool, grid_size: int | None, run_cap: int | None,
                 maximize: bool = False):
        self.grid, self.grid_size, self.run_cap = grid, grid_size, run_cap
        self.by_number: dict[int, Any] = {}
        self.by_key: dict[str, dict[int, Any]] = {}  # key -> its trials by number
        self._live: set[int] = set()  # numbers of WAITING/RUNNING trials
        self._waiting: set[int] = set()
        self._keyless: set[int] = set()  # live trials whose key is not known yet (a grid trial just created)
        self._done: set[str] = set()  # keys with a finished trial (or given up after MAX_STALE deaths)
        self._live_keys: set[str] = set()
        self._retry: set[str] = set()  # keys with an attempt that died
        self._idle: set[str] = set()  # keys neither done nor live: retried or queued again (needs_retry)
        self._first: dict[str, int] = {}  # key -> its lowest trial number that was not void (run_cap places)
        self.best: Any = None  # the best COMPLETE trial with a finite value, by the study's direction
        self.maximize = maximize
        self.update(trials)

    @property
    def trials(self) -> list:
        return [self.by_number[n] for n in sorted(self.by_number)]

    def live_trials(self) -> list:
        return [self.by_number[n] for n in sorted(self._live)]

    def update(self, trials: Iterable) -> None:
        """Take in new or changed trials (a finished trial never changes again)."""
        touched = set()
        for t in trials:
            old = self.by_number.get(t.number)
            if old is not None:
                k = key_of(old, self.grid)
                if k is not None:
                    self.by_key[k].pop(t.number, None)
                    touched.add(k)
            self.by_number[t.number] = t
            for group, member in ((self._live, outcome(t) == "live"), (self._waiting, t.state == TrialState.WAITING)):
                (group.add if member else group.discard)(t.number)
            k = key_of(t, self.grid)
            (self._keyless.add if k is None and t.number in self._live else self._keyless.discard)(t.number)
            if k is not None:
                self.by_key.setdefault(k, {})[t.number] = t
                touched.add(k)
            if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value) and (
                    self.best is None or (t.value > self.best.value if self.maximize else t.value < self.best.value)):
                self.best = t
        for k in touched:
            self._restate(k)

    def _restate(self, key: str) -> None:
        if not self.by_key.get(key):  # its only trial moved to another key
            self.by_key.pop(key, None)
            for group in (self._done, self._live_keys, self._retry, self._idle):
                group.discard(key)
            self._first.pop(key, None)
            return
        ts = self.by_key[key].values()
        outs = [outcome(t) for t in ts]
        done = "done" in outs or self.stale_count(key) >= MAX_STALE
        live = "live" in outs
        for group, member in ((self._done, done), (self._live_keys, live), (self._retry, "retry" in outs),
                              (self._idle, not done and not live)):
            (group.add if member else group.discard)(key)
        placed = [t.number for t, o in zip(ts, outs) if o != "void"]
        if placed:
            self._first[key] = min(placed)
        else:
            self._first.pop(key, None)

    def stale_count(self, key: str) -> int:
        return sum(1 for t in self.by_key.get(key, {}).values() if t.system_attrs.get("sweep_outcome") == "stale"
                   and outcome(t) == "retry")

    def done(self, key: str) -> bool:
        return key in self._done

    def live(self, key: str) -> bool:
        return key in self._live_keys

    def counted(self, below: int | None = None) -> set[str]:
        """Keys that take a place under run_cap: any trial of theirs that wasn't void."""
        return set(self._first) if below is None else {k for k, n in self._first.items() if n < below}

    def needs_retry(self) -> list[str]:
        """Keys to queue again: their last attempt died, or (grid) only duplicates that never trained hold them.

        GridSampler counts any finished trial as a visited point, so it won't pick those points itself.
        """
        grid_open = self.grid and not self.cap_reached()
        return sorted((k for k in self._idle if k in self._retry or grid_open), key=lambda k: min(self.by_key[k]))

    def untouched_grid_keys(self) -> list[str]:
        if not self.grid:
            return []
        return [k for k in (f"grid-{i}" for i in range(self.grid_size or 0)) if k not in self._first]

    def cap_reached(self) -> bool:
        return self.run_cap is not None and len(self._first) >= self.run_cap

    def finished(self) -> bool:
        if self.cap_reached():
            return self._first.keys() <= self._done
        if self.grid:
            return all(f"grid-{i}" in self._done for i in range(self.grid_size or 0))
        return False  # random/bayes without run_cap run until stopped (AGENT_COUNT or a signal)

    def work_available(self) -> bool:
        if self._waiting or self.needs_retry():
            return True
        if self.cap_reached():
            return False
        if self.grid:
            return any(f"grid-{i}" not in self._first for i in range(self.grid_size or 0))
        return True

    def pending_before(self, number: int) -> list:
        """Live trials numbered below `number` whose key is not known yet."""
        return [self.by_number[n] for n in sorted(self._keyless) if n < number]

    def verdict(self, trial) -> str | None:
        """Why `trial` (just asked, ours) must not train, or None when it may."""
        key = key_of(trial, self.grid)
        others = [t for t in self.by_key.get(key, {}).values() if t.number != trial.number]
        if any(outcome(t) == "done" for t in others) or self.stale_count(key) >= MAX_STALE:
            return "duplicate"
        if any(outcome(t) == "live" and t.number < trial.number for t in others):
            return "duplicate"
        if self.run_cap is not None:
            counted = self.counted(below=trial.number)
            if key not in counted and len(counted) >= self.run_cap:
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
