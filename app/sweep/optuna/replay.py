"""Optuna's journal replay, the same result in less time: what every process that opens a journal waits for.

Optuna rebuilds a journal's studies and trials by applying every line in order (JournalStorageReplayResult);
at 20 000 trials, 13 lines each, that is most of an agent's start and of `sweep-status`. Nearly every line
sets one param or attribute of a trial, and Optuna's step for it spends most of its time on things whose
outcome is already known: `copy.copy` of the trial (through the generic pickle protocol), parsing the same
distribution JSON again (a sweep has a handful), and comparing it field by field with the identical
distribution the study's first trial holds. `Replay` takes the same steps in the same order with the same
checks and errors, and copies the trial the way `copy.copy` does (a new object, the same attribute dict
copied), so trials handed out earlier never change under their holder. A large journal is read from its
snapshot (app.sweep.optuna.snapshot: JSON, not Optuna's pickle) and replayed only past it.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility, json_to_distribution
from optuna.storages.journal._storage import JournalStorageReplayResult
from optuna.trial import FrozenTrial

from app.sweep.optuna import snapshot


def _copy(trial: FrozenTrial) -> FrozenTrial:
    """copy.copy(trial), as `copy` makes it for a plain class (object.__reduce_ex__: new object, dict copied)."""
    new = FrozenTrial.__new__(FrozenTrial)
    new.__dict__.update(trial.__dict__)
    return new


class Replay(JournalStorageReplayResult):
    """JournalStorageReplayResult with faster steps for the three operations that make up most lines."""

    def __init__(self, worker_id_prefix: str) -> None:
        super().__init__(worker_id_prefix)
        self._parsed: dict[str, BaseDistribution] = {}  # distribution JSON -> its (shared, never changed) object

    def _distribution(self, text: str) -> BaseDistribution:
        found = self._parsed.get(text)
        if found is None:
            found = self._parsed[text] = json_to_distribution(text)
        return found

    def _apply_set_trial_param(self, log: dict[str, Any]) -> None:
        trial_id = log["trial_id"]
        if not self._trial_exists_and_updatable(trial_id, log):
            return
        param_name = log["param_name"]
        distribution = self._distribution(log["distribution"])
        for prev_trial_id in self._study_id_to_trial_ids[self._trial_id_to_study_id[trial_id]]:
            prev_trial = self._trials[prev_trial_id]
            if param_name in prev_trial.params:  # the first trial that holds the param, as Optuna looks
                prev = prev_trial.distributions[param_name]
                if prev is not distribution:  # the same object (the same JSON) is compatible with itself
                    try:
                        check_distribution_compatibility(prev, distribution)
                    except Exception:
                        if self._is_issued_by_this_worker(log):
                            raise
                        return
                break
        trial = _copy(self._trials[trial_id])
        trial.params = {**trial.params, param_name: distribution.to_external_repr(log["param_value_internal"])}
        trial.distributions = {**trial.distributions, param_name: distribution}
        self._trials[trial_id] = trial

    def _apply_set_trial_user_attr(self, log: dict[str, Any]) -> None:
        self._set_attr(log, "user_attr", "_user_attrs")

    def _apply_set_trial_system_attr(self, log: dict[str, Any]) -> None:
        self._set_attr(log, "system_attr", "_system_attrs")

    def _set_attr(self, log: dict[str, Any], key: str, field: str) -> None:
        """One user or system attribute set on a copy of the trial (FrozenTrial keeps each dict as `field`)."""
        trial_id = log["trial_id"]
        if self._trial_exists_and_updatable(trial_id, log):
            assert len(log[key]) == 1
            trial = _copy(self._trials[trial_id])
            setattr(trial, field, {**getattr(trial, field), **log[key]})
            self._trials[trial_id] = trial


class JournalStorage(optuna.storages.JournalStorage):
    """Optuna's JournalStorage, replaying through Replay (installed before its first line is read) from the
    journal's snapshot when one stands for it (app.sweep.optuna.snapshot), and writing a new snapshot when the
    first replay read snapshot.EVERY lines or more."""

    def _sync_with_backend(self) -> None:
        if type(self._replay_result) is not JournalStorageReplayResult or self._replay_result.log_number_read:
            return super()._sync_with_backend()
        with _gc_paused():
            backend, start = self._backend, (0, 0)
            path = getattr(backend, "_file_path", None) if hasattr(backend, "_resume") else None  # ours: resumable
            self._replay_result = Replay(self._worker_id_prefix)
            body = snapshot.read(path) if path else None
            if body is not None:
                restored = Replay(self._worker_id_prefix)
                if snapshot.restore(restored, body):
                    self._replay_result, start = restored, (restored.log_number_read, body["offset"])
                    backend._resume = start  # the backend reads on from the snapshot's line and byte
            self.snapshot_lines = start[0]  # how many lines came from a snapshot (0: replayed whole)
            super()._sync_with_backend()
            if path and self._replay_result.log_number_read - start[0] >= snapshot.EVERY:
                snapshot.write(path, self._replay_result, *backend._resume)


@contextlib.contextmanager
def _gc_paused():
    """The cycle collector off while a journal is first read: the read makes hundreds of thousands of objects and
    none of them cycles, yet each collection it triggers walks every trial made so far (half the time at 20 000
    trials). Reference counting still frees everything; the collector is back on after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
