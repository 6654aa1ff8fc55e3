"""An offline sweep's trials as rows: one per trial that trained or is queued, what `sweep-status`
tabulates and what the findings (app.sweep.optuna.insight) are read from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from optuna.trial import TrialState

from app.sweep.optuna.claims import key_of, outcome
from app.sweep.optuna.space import SearchSpace


def trial_rows(study, space: SearchSpace | None = None) -> list[dict[str, Any]]:
    """One row per trial that trained or is queued (duplicates never trained are left out)."""
    return rows_of(study.get_trials(deepcopy=False), study.user_attrs.get("method") == "grid", space)


def state_name(t) -> str:
    """A trial's state as sweep-status shows it: Optuna's, a FAIL told apart by why, a diverged COMPLETE."""
    state = t.state.name
    if state == "FAIL":
        return {"stale": "DIED", "preempted": "STOPPED", "interrupted": "STOPPED"}.get(
            t.system_attrs.get("sweep_outcome"), "FAIL")
    if t.system_attrs.get("sweep_outcome") == "diverged":
        return "DIVERGED"  # COMPLETE with the metric's worst value (app.sweep.optuna.trial.worst)
    return state


def rows_of(trials, grid: bool, space: SearchSpace | None = None) -> list[dict[str, Any]]:
    """trial_rows of these (whole) trials."""
    rows = []
    for t in trials:
        if outcome(t) == "void":
            continue
        values = t.user_attrs.get("values")
        if values is None:
            values = space.values(t.params) if space else dict(t.params)
        rows.append({"trial": t.number, "state": state_name(t), "key": key_of(t, grid) or "", "values": values,
                     "value": t.value, "run": t.user_attrs.get("run_id", ""),
                     "attempt": t.system_attrs.get("attempt", 1), "agent": t.user_attrs.get("agent", ""),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None,
                     "run_folder": t.user_attrs.get("run_folder", "")})
    return rows


# --------------------------------------------------------------------------------------------
# Reading a large study without loading it: the agent's view, and sweep-status's summary
# --------------------------------------------------------------------------------------------

LEDGER_ATTRS = ("sweep_key", "grid_id", "sweep_outcome")  # the system attributes claims.key_of/outcome read


@dataclass(slots=True)
class Seen:
    """A finished trial as the ledger needs it: a few bytes where its FrozenTrial holds every attribute."""

    number: int
    _trial_id: int
    state: TrialState
    value: float | None
    system_attrs: dict


def seen(t) -> Seen:
    return Seen(t.number, t._trial_id, t.state, t.value if t.state == TrialState.COMPLETE else None,
                {k: t.system_attrs[k] for k in LEDGER_ATTRS if k in t.system_attrs})


def rdb_of(storage):
    """The RDBStorage behind `storage` (Optuna wraps it in its trial cache, or storage.DirectRDB does),
    None for a journal."""
    from optuna.storages import RDBStorage

    inner = getattr(storage, "_backend", storage)
    return inner if isinstance(inner, RDBStorage) else None


def ledger_records(storage, study_id: int) -> list:
    """Every trial of the study, for the ledger: a journal's replayed FrozenTrials as they are (the journal
    holds them anyway); from PostgreSQL one query over Optuna's tables for the finished trials' numbers,
    states, values and ledger attributes (loading 20 000 whole trials takes Optuna tens of seconds and
    gigabytes), and the few unfinished ones whole (their heartbeats)."""
    rdb = rdb_of(storage)
    if rdb is None:
        return list(storage.get_all_trials(study_id, deepcopy=False))
    import sqlalchemy
    from optuna.storages._rdb import models

    trials, values, attrs = (m.__table__ for m in (models.TrialModel, models.TrialValueModel,
                                                   models.TrialSystemAttributeModel))
    query = (sqlalchemy.select(trials.c.trial_id, trials.c.number, trials.c.state, values.c.value,
                               values.c.value_type, attrs.c.key, attrs.c.value_json)
             .select_from(trials.outerjoin(values, (values.c.trial_id == trials.c.trial_id) & (values.c.objective == 0))
                          .outerjoin(attrs, (attrs.c.trial_id == trials.c.trial_id) & attrs.c.key.in_(LEDGER_ATTRS)))
             .where(trials.c.study_id == study_id))
    found: dict[int, Seen] = {}
    with rdb.engine.connect() as conn:
        for tid, number, state, value, value_type, key, value_json in conn.execute(query):
            t = found.get(tid)
            if t is None:
                state = TrialState[state] if isinstance(state, str) else TrialState(state)
                value = (models.TrialValueModel.stored_repr_to_value(value, value_type)
                         if value_type is not None and state == TrialState.COMPLETE else None)
                t = found[tid] = Seen(number, tid, state, value, {})
            if key is not None:
                t.system_attrs[key] = json.loads(value_json)
    unfinished = {tid for tid, t in found.items() if not t.state.is_finished()}
    whole = rdb._get_trials(study_id, None, unfinished, max(found, default=-1)) if unfinished else []
    return sorted([*(t for tid, t in found.items() if tid not in unfinished), *whole], key=lambda t: t.number)


def whole_trials(storage, study_id: int, trial_ids: Iterable[int]) -> list:
    """These trials whole (params, user attributes), in one query on PostgreSQL."""
    ids = set(trial_ids)
    rdb = rdb_of(storage)
    if rdb is None:  # the journal's replayed trials, by reference
        return [t for t in storage.get_all_trials(study_id, deepcopy=False) if t._trial_id in ids]
    # Optuna reads "these ids, or any above the last": the last is put beyond every id
    return sorted(rdb._get_trials(study_id, None, ids, 2**31 - 1), key=lambda t: t.number) if ids else []


class TrialView:
    """An agent's view of its study's trials, brought up to date by reading only what can have changed:
    trials it has not seen and the ones not finished when it last looked (a finished trial never changes).
    A journal's storage already holds the replayed file; PostgreSQL is asked for exactly those rows."""

    def __init__(self, storage, study_id: int):
        self.storage, self.study_id = storage, study_id
        self.rdb = rdb_of(storage)
        self.unfinished: set[int] = set()  # trial ids
        self.last_id = -1  # the highest trial id seen
        self.count = 0  # trials seen (a journal lists them by number)
        self.loaded = False

    def changes(self) -> list:
        """Trials new or changed since the last call (the first call: all of them)."""
        if not self.loaded:
            got, self.loaded = ledger_records(self.storage, self.study_id), True
        elif self.rdb is None:  # each call reads only the lines appended since the last, then looks up
            got = [self.storage.get_trial(i) for i in self.unfinished]
            number = self.count
            while (tid := self._journal_id(number)) is not None:
                got.append(self.storage.get_trial(tid))
                number += 1
        else:
            got = self.rdb._get_trials(self.study_id, None, self.unfinished, self.last_id)
        for t in got:
            (self.unfinished.discard if t.state.is_finished() else self.unfinished.add)(t._trial_id)
            self.last_id = max(self.last_id, t._trial_id)
        self.count = max(self.count, *(t.number + 1 for t in got)) if got else self.count
        # a finished trial from PostgreSQL is kept small; a journal's is the storage's own object
        return [seen(t) if self.rdb is not None and t.state.is_finished() and not isinstance(t, Seen) else t for t in got]

    def _journal_id(self, number: int) -> int | None:
        try:
            return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        except KeyError:
            return None
