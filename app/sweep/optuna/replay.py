"""Optuna's journal replay, the same result in less time: what every process that opens a journal waits for.

Optuna rebuilds a journal's studies and trials by applying every line in order (JournalStorageReplayResult);
at 20 000 trials, 13 lines each, that is most of an agent's start and of `sweep-status`. Nearly every line
sets one param or attribute of a trial, and Optuna's step for it spends most of its time on things whose
outcome is already known: `copy.copy` of the trial (through the generic pickle protocol), parsing the same
distribution JSON again (a sweep has a handful), and comparing it field by field with the identical
distribution the study's first trial holds. `Replay` takes the same steps in the same order with the same
checks and errors, and copies the trial the way `copy.copy` does (a new object, the same attribute dict
copied), so trials handed out earlier never change under their holder. No snapshot (Optuna's is a pickle
beside the journal: unpickling a file on a shared volume can run code) is read or written.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility, json_to_distribution
from optuna.storages.journal._storage import JournalStorageReplayResult
from optuna.trial import FrozenTrial


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
        trial_id = log["trial_id"]
        if self._trial_exists_and_updatable(trial_id, log):
            assert len(log["user_attr"]) == 1
            trial = _copy(self._trials[trial_id])
            trial.user_attrs = {**trial.user_attrs, **log["user_attr"]}
            self._trials[trial_id] = trial

    def _apply_set_trial_system_attr(self, log: dict[str, Any]) -> None:
        trial_id = log["trial_id"]
        if self._trial_exists_and_updatable(trial_id, log):
            assert len(log["system_attr"]) == 1
            trial = _copy(self._trials[trial_id])
            trial.system_attrs = {**trial.system_attrs, **log["system_attr"]}
            self._trials[trial_id] = trial


class JournalStorage(optuna.storages.JournalStorage):
    """Optuna's JournalStorage, replaying through Replay (installed before its first line is read)."""

    def _sync_with_backend(self) -> None:
        if type(self._replay_result) is JournalStorageReplayResult and self._replay_result.log_number_read == 0:
            self._replay_result = Replay(self._worker_id_prefix)
        super()._sync_with_backend()
