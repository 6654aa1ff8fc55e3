"""A journal opened by the package replays to exactly what Optuna's own replay gives (app.sweep.optuna.replay),
rejected lines included, without changing trials handed out before; and an agent's start reads the journal
once (the storage check_environment opened is the agent's)."""

from __future__ import annotations

import pytest
from conftest import clean_env
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage as OptunaJournal
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from app.sweep.optuna import agent, replay, storage as sweep_storage
from app.sweep.optuna.plan import plan

LR = FloatDistribution(1e-4, 1e-1, log=True)
BATCH = CategoricalDistribution([32, 64, 128])
LAYERS = IntDistribution(1, 4)


def two_writers(path) -> None:
    """A journal two workers wrote: params, attributes, finished and running trials, and lines Optuna's replay
    rejects (an update of a finished trial, a param whose distribution disagrees with the study's)."""
    a, b = (OptunaJournal(JournalFileBackend(str(path))) for _ in range(2))
    sid = a.create_new_study([])
    for i in range(6):
        tid = a.create_new_trial(sid)
        a.set_trial_param(tid, "lr", LR.to_internal_repr(10 ** -(1 + i % 3)), LR)
        a.set_trial_param(tid, "batch", BATCH.to_internal_repr([32, 64, 128][i % 3]), BATCH)
        a.set_trial_param(tid, "layers", i % 4 + 1, LAYERS)
        a.set_trial_user_attr(tid, "values", {"lr": i, "nested": [1, {"x": 2}]})
        a.set_trial_system_attr(tid, "sweep_key", f"trial-{i}")
        a.set_trial_system_attr(tid, "heartbeat", 1000.0 + i)
        a.set_trial_intermediate_value(tid, 0, 0.5 + i)
        if i < 4:
            a.set_trial_state_values(tid, TrialState.COMPLETE if i % 2 else TrialState.FAIL, [0.1 * i] if i % 2 else None)
    with pytest.raises(UpdateFinishedTrialError):
        b.set_trial_system_attr(1, "late", True)  # written, then rejected on replay: trial 1 is finished
    with pytest.raises(ValueError):
        b.set_trial_param(4, "batch", 0, CategoricalDistribution(["other"]))  # not the study's distribution
    b.set_trial_system_attr(4, "heartbeat", 2000.0)  # the other worker's line on a running trial
    a.set_study_user_attr(sid, "metric", "val_accuracy")


def test_the_faster_replay_gives_what_optunas_gives(tmp_path):
    path = tmp_path / "two.journal"
    two_writers(path)
    theirs = OptunaJournal(JournalFileBackend(str(path)))
    ours = replay.JournalStorage(JournalFileBackend(str(path)))
    assert type(ours._replay_result) is replay.Replay  # the faster steps are the ones that ran
    assert [s.__dict__ for s in ours.get_all_studies()] == [s.__dict__ for s in theirs.get_all_studies()]
    got, want = ours.get_all_trials(0, deepcopy=False), theirs.get_all_trials(0, deepcopy=False)
    assert [t.__dict__ for t in got] == [t.__dict__ for t in want]
    assert "late" not in got[1].system_attrs and got[4].system_attrs["heartbeat"] == 2000.0


def test_a_trial_handed_out_is_not_changed_by_a_later_line(tmp_path):
    path = tmp_path / "two.journal"
    two_writers(path)
    ours = replay.JournalStorage(JournalFileBackend(str(path)))
    held = ours.get_trial(5)  # running: more lines will come for it
    before = (dict(held.params), dict(held.user_attrs), dict(held.system_attrs))
    ours.set_trial_system_attr(5, "heartbeat", 3000.0)
    ours.set_trial_user_attr(5, "run_id", "abc")
    ours.set_trial_param(5, "extra", 2, LAYERS)
    assert (held.params, held.user_attrs, held.system_attrs) == before
    now = ours.get_trial(5)
    assert now.system_attrs["heartbeat"] == 3000.0 and now.user_attrs["run_id"] == "abc" and now.params["extra"] == 2


SWEEP = """name: once
method: random
metric: {name: val_accuracy, goal: maximize}
parameters:
  learning_rate: {min: 0.001, max: 0.1}
"""


def test_an_agent_uses_the_storage_its_check_opened_and_not_a_replaced_journal(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(SWEEP)
    env = clean_env(tmp_path, SWEEP_CONFIG=str(cfg), WANDB_DIR=str(tmp_path / "runs"), WANDB_MODE="offline")
    p = agent.check_environment(env)
    kept = sweep_storage._handed[p.storage_url][0]
    assert agent.Agent(p, env).storage is kept  # one replay of the journal, not two
    assert sweep_storage.handed_over(p.storage_url) is None  # handed over once
    agent.check_environment(env, p)
    second = sweep_storage._handed[p.storage_url][0]
    path = tmp_path / "runs" / "sweeps" / "once.journal"
    copy = path.with_name("copy.journal")
    copy.write_bytes(path.read_bytes())
    copy.replace(path)  # a new file under the same name (a repair does this)
    fresh = agent.Agent(plan(env), env).storage
    assert fresh is not second and fresh is not kept  # opened again: the kept one replayed the old file


def test_the_reader_yields_what_optunas_yields_from_any_line_and_after_appends(tmp_path):
    from app.sweep.optuna.journal import JournalDamaged, SafeJournalBackend

    path = tmp_path / "two.journal"
    two_writers(path)
    ours, theirs = SafeJournalBackend(str(path)), JournalFileBackend(str(path))
    whole = list(theirs.read_logs(0))
    assert list(ours.read_logs(0)) == whole and len(whole) > 40
    for start in (0, 7, len(whole) - 1, len(whole), len(whole) + 3):  # from any line, fresh and resumed
        assert list(SafeJournalBackend(str(path)).read_logs(start)) == whole[start:]
        assert list(ours.read_logs(start)) == list(theirs.read_logs(start))
    with open(path, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"w","study_id":0,"user_attr":{"k":1}}\n{"op_code":5,"wor')
    assert list(ours.read_logs(len(whole))) == list(theirs.read_logs(len(whole))) == [
        {"op_code": 5, "worker_id": "w", "study_id": 0, "user_attr": {"k": 1}}]  # a partial last line: not yet
    with open(path, "ab") as f:
        f.write(b'ker_id":"w"\n')  # a whole line and no JSON: the last one is skipped (it may be mid-write) ...
    assert list(ours.read_logs(len(whole) + 1)) == list(theirs.read_logs(len(whole) + 1)) == []
    with open(path, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"w","study_id":0,"user_attr":{"k":2}}\n')
    with pytest.raises(JournalDamaged, match=f"damaged at line {len(whole) + 2} "):  # ... until a line follows it
        list(ours.read_logs(len(whole) + 1))
