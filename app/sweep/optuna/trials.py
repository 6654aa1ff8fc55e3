"""An offline sweep's trials as rows: one per trial that trained or is queued, what `sweep-status`
tabulates and what the findings (app.sweep.optuna.insight) are read from."""

from __future__ import annotations

from typing import Any

from app.sweep.optuna.claims import key_of, outcome
from app.sweep.optuna.space import SearchSpace


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
        elif t.system_attrs.get("sweep_outcome") == "diverged":
            state = "DIVERGED"  # COMPLETE with the metric's worst value (app.sweep.optuna.trial.worst)
        rows.append({"trial": t.number, "state": state, "key": key_of(t, grid) or "", "values": values,
                     "value": t.value, "run": t.user_attrs.get("run_id", ""),
                     "attempt": t.system_attrs.get("attempt", 1), "agent": t.user_attrs.get("agent", ""),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None,
                     "run_folder": t.user_attrs.get("run_folder", "")})
    return rows
