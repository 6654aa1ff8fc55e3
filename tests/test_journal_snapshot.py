"""A journal's snapshot (app.sweep.optuna.snapshot): a process that opens a journal with one reads only the lines
after it and ends with exactly what Optuna's whole replay gives; a snapshot that does not stand for the journal
as it is (repaired, replaced, damaged, another version) is ignored, the journal replayed whole."""

from __future__ import annotations

import json

import pytest
from optuna.distributions import CategoricalDistribution
from optuna.storages import JournalStorage as OptunaJournal
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from test_journal_replay import BATCH, LAYERS, LR, two_writers

from app.sweep.optuna import journal, replay, snapshot


@pytest.fixture(autouse=True)
def every_few_lines(monkeypatch):
    monkeypatch.setattr(snapshot, "EVERY", 10)  # the small journals here get snapshots, as large ones do


def ours(path) -> replay.JournalStorage:
    return replay.JournalStorage(journal.SafeJournalBackend(str(path)))


def same_as_optunas(storage, path) -> None:
    theirs = OptunaJournal(JournalFileBackend(str(path)))
    assert [s.__dict__ for s in storage.get_all_studies()] == [s.__dict__ for s in theirs.get_all_studies()]
    for s in theirs.get_all_studies():
        want = [t.__dict__ for t in theirs.get_all_trials(s._study_id, deepcopy=False)]
        assert [t.__dict__ for t in storage.get_all_trials(s._study_id, deepcopy=False)] == want and want


def more_lines(path) -> None:
    """Another worker's lines after the snapshot: a new trial, a running trial finished, a rejected update."""
    w = OptunaJournal(JournalFileBackend(str(path)))
    tid = w.create_new_trial(0)
    w.set_trial_param(tid, "lr", LR.to_internal_repr(0.003), LR)
    w.set_trial_param(tid, "batch", BATCH.to_internal_repr(64), BATCH)
    w.set_trial_param(tid, "layers", 3, LAYERS)
    w.set_trial_intermediate_value(tid, 2, float("inf"))
    w.set_trial_state_values(4, TrialState.COMPLETE, [0.75])
    w.set_trial_user_attr(5, "run_id", "later")
    with pytest.raises(ValueError):
        w.set_trial_param(tid, "batch", 0, CategoricalDistribution(["other"]))


def test_a_journal_opened_from_its_snapshot_is_what_optunas_whole_replay_gives(tmp_path):
    path = tmp_path / "two.journal"
    two_writers(path)
    first = ours(path)
    assert first.snapshot_lines == 0 and snapshot.path_of(path).is_file()  # replayed whole, snapshot written
    lines = snapshot.read(path)["lines"]
    assert lines == first._replay_result.log_number_read > 40
    more_lines(path)
    second = ours(path)
    assert second.snapshot_lines == lines  # only the lines after it were read
    assert second._replay_result.log_number_read > lines
    same_as_optunas(second, path)
    held = second.get_trial(5)
    second.set_trial_system_attr(5, "heartbeat", 9.0)  # writing on from a snapshot, as an agent does
    assert held.system_attrs["heartbeat"] == 1005.0 and second.get_trial(5).system_attrs["heartbeat"] == 9.0
    same_as_optunas(ours(path), path)


def test_a_repaired_or_replaced_journal_is_replayed_whole(tmp_path):
    path = tmp_path / "two.journal"
    two_writers(path)
    ours(path)
    lines = path.read_bytes().splitlines(keepends=True)
    edited = lines[7].replace(b'"heartbeat"', b'"heartbeaT"')  # same length: only the bytes differ
    assert edited != lines[7] and len(edited) == len(lines[7])
    path.write_bytes(b"".join(lines[:7] + [edited] + lines[8:]))
    again = ours(path)
    assert again.snapshot_lines == 0
    same_as_optunas(again, path)
    path.write_bytes(b"".join(lines[:20]))  # shorter than the snapshot's offset
    assert ours(path).snapshot_lines == 0
    same_as_optunas(ours(path), path)


@pytest.mark.parametrize("damage", ["flipped byte", "cut short", "no header", "larger than the journal"])
def test_a_damaged_snapshot_is_one_line_and_the_journal_is_replayed_whole(tmp_path, capfd, damage):
    path = tmp_path / "two.journal"
    two_writers(path)
    ours(path)
    snap = snapshot.path_of(path)
    blob = snap.read_bytes()
    if damage == "flipped byte":
        i = blob.index(b'"trials"') + 3
        blob = blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:]
    elif damage == "cut short":
        blob = blob[:len(blob) // 2]
    elif damage == "no header":
        blob = blob.split(b"\n", 1)[1]
    else:
        blob += b" " * (path.stat().st_size + snapshot.SLACK)
    snap.write_bytes(blob)
    capfd.readouterr()
    storage = ours(path)
    err = capfd.readouterr().err
    assert storage.snapshot_lines == 0
    assert err.count("\n") == 1 and f"ignoring {snap.name}: " in err and "replaying the journal" in err
    same_as_optunas(storage, path)
    assert snapshot.read(path) is not None  # the whole replay wrote a good one in its place


def test_another_optuna_or_time_zone_snapshot_is_ignored_quietly(tmp_path, capfd, monkeypatch):
    path = tmp_path / "two.journal"
    two_writers(path)
    ours(path)
    capfd.readouterr()
    monkeypatch.setattr(snapshot.optuna, "__version__", "0.0.1")
    assert ours(path).snapshot_lines == 0
    monkeypatch.undo()
    monkeypatch.setattr(snapshot, "EVERY", 10)
    ours(path)  # rewritten for this version
    monkeypatch.setattr(snapshot, "_zone", lambda: [0, 0, 0, ["XYZ", "XYZ"]])
    assert ours(path).snapshot_lines == 0
    assert capfd.readouterr().err == ""


def test_a_value_that_would_not_read_back_as_itself_gets_no_snapshot(tmp_path):
    path = tmp_path / "odd.journal"
    w = OptunaJournal(JournalFileBackend(str(path)))
    sid = w.create_new_study([])
    odd = CategoricalDistribution([1, True])  # equal choices: True (index 1) would be written back as index 0
    for index in (0, 1, 0, 1):
        tid = w.create_new_trial(sid)
        w.set_trial_param(tid, "odd", index, odd)
        w.set_trial_user_attr(tid, "n", tid)
    storage = ours(path)
    assert storage.get_trial(1).params["odd"] is True and not snapshot.path_of(path).exists()
    same_as_optunas(storage, path)


def test_a_repair_removes_the_snapshot(tmp_path):
    path = tmp_path / "two.journal"
    two_writers(path)
    ours(path)
    with open(path, "ab") as f:
        f.write(b"not json\n" + json.dumps({"op_code": 2, "worker_id": "w", "study_id": 0,
                                            "user_attr": {"k": 1}}).encode() + b"\n")
    journal.repair(path)
    assert not snapshot.path_of(path).exists()
    same_as_optunas(ours(path), path)
