"""Fault matrix for state on disk and untrusted files: each fault is refused in ONE `error:` line (or
handled as documented), with no traceback, and what was on disk before is intact afterwards.

Classes: resuming into a different run (4) and checkpoints from elsewhere (their structure and shapes),
damaged sweep journals (unknown op codes, files that are not journals, read-only storage, stale locks)
and run logs (5), archives from elsewhere (6, names too long included), untrusted YAML sizes (7), the
report's --out, waiting on an unreachable W&B server (9) or a database that accepts and never answers.

    .venv/bin/python -m pytest -q tests/test_faults_state.py
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import clean_env, error_lines, run_app

from app import runlog
from app.sweep.optuna import agent
from app.sweep.optuna import journal
from app.sweep.optuna import storage as sweep_storage

SETTLE = {"EPOCHS": "1", "TRAIN_STRIDE": "10", "VAL_SIZE": "200", "WATCH_LOG": "none", "WANDB_MODE": "offline",
          "BATCH_SIZE": "32", "LOG_INTERVAL": "2"}


def refused(proc, *needles: str, width: int = 300) -> str:
    """Exit 2, exactly one error line (at most `width` characters) naming each needle, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert len(lines[0]) <= width, lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256: what 'intact' means."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------------------------
# 4. Resuming into a different run
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_data):
    """One finished run (id done0001) and the env that made it."""
    cwd = tmp_path_factory.mktemp("resume")
    env = clean_env(cwd, DATA_DIR=str(small_data), OUTPUT_DIR=str(cwd / "outputs"), WANDB_DIR=str(cwd / "runs"),
                    WANDB_RUN_ID="done0001", **SETTLE)
    proc = run_app(["train"], env, cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (cwd / "outputs" / "done0001" / "model.onnx").is_file()
    return cwd, env


def unfinished(cwd: Path, run_id: str) -> Path:
    """A run stopped after its first epoch: the finished run's checkpoint without the export."""
    folder = cwd / "outputs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cwd / "outputs" / "done0001" / "checkpoint.pt", folder / "checkpoint.pt")
    return folder


def test_a_finished_run_id_is_not_run_again(finished_run):
    cwd, env = finished_run
    before = tree(cwd / "runs"), tree(cwd / "outputs")
    refused(run_app(["train"], env, cwd), "run done0001 already finished", "WANDB_RUN_ID")
    assert (tree(cwd / "runs"), tree(cwd / "outputs")) == before  # no second W&B run, no new export


@pytest.mark.parametrize("arg, shown", [
    ("--kernels=8", "kernels 16,32 -> 8"),
    ("--classes=12", "classes 10 -> 12"),
    ("--learning_rate=0.05", "learning_rate 0.005 -> 0.05"),
    ("--batch_size=16", "batch_size 32 -> 16"),
    ("--seed=3", "seed 0 -> 3"),
    ("--train_stride=5", "train_stride 10 -> 5"),
    ("--val_size=300", "val_size 200 -> 300"),
    ("--amp=bf16", "amp none -> bf16"),
])
def test_resuming_with_other_training_settings_is_refused(finished_run, arg, shown):
    cwd, env = finished_run
    run_id = "diff" + hashlib.sha256(arg.encode()).hexdigest()[:4]
    folder = unfinished(cwd, run_id)
    before = tree(cwd / "runs"), tree(folder)
    refused(run_app(["train", arg], {**env, "WANDB_RUN_ID": run_id}, cwd), f"run {run_id}", shown)
    assert (tree(cwd / "runs"), tree(folder)) == before  # refused before wandb.init: no run to sync


def test_fewer_epochs_than_trained_is_refused(finished_run):
    cwd, env = finished_run
    folder = unfinished(cwd, "fewer001")
    (folder / "checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes())
    import torch

    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    state["epoch"] = 3
    torch.save(state, folder / "checkpoint.pt")
    before = tree(cwd / "runs")
    refused(run_app(["train", "--epochs=2"], {**env, "WANDB_RUN_ID": "fewer001"}, cwd), "epochs=2", "3 epoch(s)")
    assert tree(cwd / "runs") == before


def test_a_damaged_checkpoint_is_one_line(finished_run):
    cwd, env = finished_run
    folder = unfinished(cwd, "broken01")
    blob = (folder / "checkpoint.pt").read_bytes()
    (folder / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    refused(run_app(["train"], {**env, "WANDB_RUN_ID": "broken01"}, cwd), "checkpoint", "damaged")


def _wrong_shape(state):
    state["model"]["features.0.weight"] = state["model"]["features.0.weight"][:8]  # 8 kernels, not 16


def _other_kernels_no_config(state):
    """A checkpoint from another program: other kernels, no `config` entry to compare settings with."""
    del state["config"]
    state["model"]["features.3.weight"] = state["model"]["features.3.weight"][:, :8]


def _optimizer_state_shape(state):
    state["optimizer"]["state"][4]["exp_avg"] = state["optimizer"]["state"][4]["exp_avg"][:, :7]


def _other_device_type(state):
    """The generator of the device type the run was not written on: CUDA's 16-byte Philox state (seed,
    offset) for a CPU checkpoint, the CPU's for a CUDA one."""
    import torch

    cuda = state["generator"].numel() == 16
    state["generator"] = torch.Generator().get_state() if cuda else torch.zeros(16, dtype=torch.uint8)


# (how the checkpoint is damaged, a fragment of the one line): each is untrusted input from elsewhere
CHECKPOINT_CASES = {
    "no-config-other-kernels": (_other_kernels_no_config, "config"),
    "no-config": (lambda s: s.pop("config"), "config"),
    "no-optimizer": (lambda s: s.pop("optimizer"), "optimizer"),
    "no-generator": (lambda s: s.pop("generator"), "generator"),
    "no-epoch": (lambda s: s.pop("epoch"), "epoch"),
    "wrong-shape": (_wrong_shape, "features.0.weight"),
    "missing-weight": (lambda s: s["model"].pop("fc.bias"), "fc.bias"),
    "extra-weight": (lambda s: s["model"].update({"fc2.weight": s["model"]["fc.weight"]}), "fc2.weight"),
    "weight-not-a-tensor": (lambda s: s["model"].update({"fc.bias": [0.0] * 10}), "fc.bias"),
    "model-not-a-dict": (lambda s: s.update(model=[1, 2, 3]), "model"),
    "optimizer-not-a-dict": (lambda s: s.update(optimizer="adam"), "optimizer"),
    "optimizer-no-param-groups": (lambda s: s["optimizer"].pop("param_groups"), "optimizer"),
    "optimizer-params-wrong": (lambda s: s["optimizer"]["param_groups"][0].update(params=[0, 1]), "optimizer"),
    "optimizer-state-shape": (_optimizer_state_shape, "optimizer"),
    "epoch-a-string": (lambda s: s.update(epoch="1"), "epoch"),
    "epoch-negative": (lambda s: s.update(epoch=-1), "epoch"),
    "examples-seen-a-float": (lambda s: s.update(examples_seen=1.5), "examples_seen"),
    "epoch-examples-negative": (lambda s: s.update(epoch_examples=-32), "epoch_examples"),
    "generator-not-bytes": (lambda s: s.update(generator=s["generator"].float()), "generator"),
    "generator-of-the-other-device-type": (_other_device_type, "its data order cannot continue on another device type"),
    "config-not-a-dict": (lambda s: s.update(config="kernels=8"), "config"),
    "not-a-dict": (lambda s: (s.clear(), s.update(model={})), "checkpoint"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=list(CHECKPOINT_CASES))
def test_a_checkpoint_from_elsewhere_is_checked_before_training(finished_run, case):
    import torch

    cwd, env = finished_run
    damage, fragment = CHECKPOINT_CASES[case]
    run_id = "ckpt" + hashlib.sha256(case.encode()).hexdigest()[:4]
    folder = unfinished(cwd, run_id)
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    damage(state)
    torch.save(state, folder / "checkpoint.pt")
    before = tree(cwd / "runs"), tree(folder)
    line = refused(run_app(["train"], {**env, "WANDB_RUN_ID": run_id}, cwd), str(folder / "checkpoint.pt"), fragment,
                   width=400)
    assert "resume=false" in line
    assert (tree(cwd / "runs"), tree(folder)) == before  # refused before wandb.init: no run to sync


def test_more_epochs_continue_an_unfinished_run(finished_run):
    """What may change on resume: epochs grow, and where/how fast it runs (channels_last, log_interval)."""
    cwd, env = finished_run
    unfinished(cwd, "grow0001")
    proc = run_app(["train", "--epochs=2", "--channels_last=false", "--log_interval=3"],
                   {**env, "WANDB_RUN_ID": "grow0001"}, cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming run grow0001" in proc.stdout and "1 epoch(s) done" in proc.stdout
    assert (cwd / "outputs" / "grow0001" / "model.onnx").is_file()


# --------------------------------------------------------------------------------------------
# 5. Damaged state: the offline sweep's journal
# --------------------------------------------------------------------------------------------

SWEEP_YAML = """name: faults
method: grid
metric: {name: val_accuracy, goal: maximize}
parameters:
  learning_rate: {values: [0.01, 0.02]}
  epochs: {value: 1}
"""


@pytest.fixture
def sweep(tmp_path):
    """A sweep whose study exists in its journal (what an agent writes first), and its env."""
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(SWEEP_YAML)
    env = clean_env(tmp_path, SWEEP_CONFIG=str(cfg), WANDB_DIR=str(tmp_path / "runs"), WANDB_MODE="offline",
                    OUTPUT_DIR=str(tmp_path / "outputs"), DATA_DIR=str(tmp_path / "no-data"))
    agent.check_environment(env)
    path = tmp_path / "runs" / "sweeps" / "faults.journal"
    assert path.is_file() and path.read_bytes().endswith(b"\n")
    return tmp_path, env, path


def damage(path: Path, how: str) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    if how == "garbage-middle":
        lines.insert(2, b'{"op_code": 5, "trial_id"\x00\xff garbage\n')
    elif how == "garbage-last":
        lines.append(b"not json at all\n")
    elif how == "not-an-operation":
        lines.insert(1, b'["a list", "not an operation"]\n')
    elif how == "binary":
        lines = [bytes(range(256)) * 4 + b"\n", *lines]
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("how", ["garbage-middle", "garbage-last", "not-an-operation", "binary"])
@pytest.mark.parametrize("command", [["offline-agent"], ["sweep-status"]])
def test_a_damaged_journal_is_refused_with_the_repair_command(sweep, how, command):
    cwd, env, path = sweep
    damage(path, how)
    before = path.read_bytes()
    line = refused(run_app(command, env, cwd, timeout=120), "faults.journal is damaged at line",
                   f"python -m app sweep-repair {path}", width=200 + len(str(path)))
    assert "nothing was written" in line
    assert path.read_bytes() == before  # never written on
    assert not (cwd / "runs" / "wandb").exists() and not (cwd / "outputs").exists()  # no trial started


def test_a_crashed_append_is_cut_before_the_next_write(sweep):
    """A partial last line (host crash mid-append): readers skip it; a writer cuts it under the lock."""
    cwd, env, path = sweep
    good = path.read_bytes()
    path.write_bytes(good + b'{"op_code": 7, "trial_id": 0, "us')
    status = run_app(["sweep-status"], env, cwd, timeout=120)
    assert status.returncode == 0 and "sweep faults" in status.stdout, status.stderr
    assert path.read_bytes().endswith(b'"us')  # a read-only look changes nothing
    storage = sweep_storage.open_storage(str(path))  # what an agent does first
    assert path.read_bytes() == good
    path.write_bytes(good + b'{"op_code": 7, "tr')  # the crash happens while this agent runs
    sid = storage.get_study_id_from_name("faults")
    storage.set_study_user_attr(sid, "after", 1)  # the next append lands on a whole line
    reread = sweep_storage.load_study(str(path), "faults")
    assert reread.user_attrs["after"] == 1 and journal.scan(path).bad == []


def test_sweep_repair_drops_the_damaged_line_and_keeps_a_copy(sweep):
    cwd, env, path = sweep
    good_ops = journal.scan(path).operations
    damage(path, "garbage-middle")
    damaged = path.read_bytes()
    dry = run_app(["sweep-repair", "--dry-run", str(path)], env, cwd)
    assert dry.returncode == 0 and "would repair" in dry.stdout and path.read_bytes() == damaged
    fixed = run_app(["sweep-repair", str(path)], env, cwd)
    assert fixed.returncode == 0 and "repaired: dropped 1 damaged line(s) (3)" in fixed.stdout, fixed.stdout + fixed.stderr
    [copy] = path.parent.glob("faults.journal.damaged-*")
    assert copy.read_bytes() == damaged
    assert journal.scan(path).bad == [] and journal.scan(path).operations == good_ops
    status = run_app(["sweep-status"], env, cwd)
    assert status.returncode == 0, status.stderr
    again = run_app(["sweep-repair", str(path)], env, cwd)
    assert again.returncode == 0 and "intact" in again.stdout


def test_sweep_repair_of_a_missing_journal_is_one_line(tmp_path):
    refused(run_app(["sweep-repair", str(tmp_path / "none.journal")], clean_env(tmp_path), tmp_path), "no sweep journal")


def test_a_journal_path_that_is_a_folder_is_one_line(sweep):
    cwd, env, path = sweep
    folder = cwd / "a-folder"
    folder.mkdir()
    refused(run_app(["offline-agent", "--storage", str(folder)], env, cwd), "is not a file")


def test_an_endless_journal_line_is_damage(sweep, monkeypatch):
    cwd, env, path = sweep
    monkeypatch.setattr(journal, "MAX_LINE", 1000)
    with open(path, "ab") as f:
        f.write(b"x" * 5000 + b"\n")
    with pytest.raises(journal.JournalDamaged, match="damaged at line"):
        sweep_storage.open_storage(str(path))


UNKNOWN_OPS = {
    "op-code-99": b'{"op_code": 99, "worker_id": "w"}\n',
    "op-code-negative": b'{"op_code": -1, "worker_id": "w"}\n',
    "op-code-a-string": b'{"op_code": "4", "worker_id": "w"}\n',
    "op-code-true": b'{"op_code": true, "worker_id": "w"}\n',
    "op-code-float": b'{"op_code": 4.5, "worker_id": "w"}\n',
    "op-code-null": b'{"op_code": null}\n',
}


@pytest.mark.parametrize("case", UNKNOWN_OPS, ids=list(UNKNOWN_OPS))
def test_an_unknown_operation_is_damage_that_sweep_repair_repairs(sweep, case):
    cwd, env, path = sweep
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:1], UNKNOWN_OPS[case], *lines[1:]]))
    before = path.read_bytes()
    for command in (["offline-agent"], ["sweep-status"]):
        refused(run_app(command, env, cwd, timeout=120), "faults.journal is damaged at line 2",
                f"python -m app sweep-repair {path}", width=200 + len(str(path)))
        assert path.read_bytes() == before
    fixed = run_app(["sweep-repair", str(path)], env, cwd)
    assert fixed.returncode == 0 and "repaired: dropped 1 damaged line(s) (2)" in fixed.stdout, fixed.stdout + fixed.stderr
    status = run_app(["sweep-status"], env, cwd)
    assert status.returncode == 0 and "sweep faults" in status.stdout, status.stderr


@settings(max_examples=200, deadline=None)
@given(line=st.one_of(st.binary(max_size=200).filter(lambda b: b"\n" not in b),
                      st.dictionaries(st.sampled_from(["op_code", "worker_id", "study_id"]),
                                      st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(), st.text(max_size=3)),
                                      max_size=3).map(lambda d: json.dumps(d).encode())))
def test_scan_counts_a_line_as_an_operation_only_with_a_known_op_code(tmp_path_factory, line):
    path = tmp_path_factory.mktemp("scan") / "j.journal"
    path.write_bytes(b'{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n' + line + b"\n")
    s = journal.scan(path)
    try:
        op = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        op = None
    known = isinstance(op, dict) and type(op.get("op_code")) is int and 0 <= op["op_code"] <= 10
    assert (s.operations, s.bad) == ((2, []) if known else (1, [2]))


NOT_JOURNALS = {
    "a-sweep-yaml": SWEEP_YAML.encode(),
    "binary": bytes(range(256)) * 8,
    "json-lines-not-operations": b'{"name": "a"}\n{"name": "b"}\n',
    "a-log-file": b"2026-12-01 agent started\n2026-12-01 trial 0 complete\n",
}


@pytest.mark.parametrize("case", NOT_JOURNALS, ids=list(NOT_JOURNALS))
def test_sweep_repair_refuses_a_file_that_is_not_a_journal(tmp_path, case):
    path = tmp_path / "thing.journal"
    path.write_bytes(NOT_JOURNALS[case])
    refused(run_app(["sweep-repair", str(path)], clean_env(tmp_path), tmp_path), "not a sweep journal", "nothing changed")
    assert path.read_bytes() == NOT_JOURNALS[case]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "wandb-config") == ["thing.journal"]


def _read_only(path: Path, how: str):
    """Make `path` unwritable even for root: immutable (chattr +i) or a read-only bind mount of its folder."""
    import subprocess

    if how == "immutable":
        cmd, undo = ["chattr", "+i", str(path)], ["chattr", "-i", str(path)]
    else:
        cmd, undo = ["mount", "--bind", "-o", "ro", str(path), str(path)], ["umount", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        message = f"cannot make {path} read-only here ({done.stderr.strip()})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI runs as root)")
        pytest.skip(message)
    return lambda: subprocess.run(undo, check=True)


@pytest.mark.parametrize("how", ["immutable-journal", "read-only-runs-volume"])
def test_read_only_sweep_storage_allows_status_and_refuses_an_agent(sweep, how):
    cwd, env, path = sweep
    before = path.read_bytes()
    undo = _read_only(path if how == "immutable-journal" else cwd / "runs", how.split("-")[0])
    try:
        status = run_app(["sweep-status"], env, cwd)
        assert status.returncode == 0 and "sweep faults" in status.stdout, status.stderr[-2000:]
        line = refused(run_app(["offline-agent"], env, cwd, timeout=120), "faults.journal", "not writable")
        assert "sweep-status" in line  # what still works
    finally:
        undo()
    assert path.read_bytes() == before


def _stale_lock(path: Path, age_s: float) -> Path:
    lock = Path(f"{path}.lock")
    lock.write_bytes(b"")
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_stale_journal_lock_is_said_and_cleared_not_waited_on(sweep, capsys):
    cwd, env, path = sweep
    lock = _stale_lock(path, 3600)  # left an hour ago by an agent that died mid-append
    storage = sweep_storage.open_storage(str(path))
    started = time.monotonic()
    storage.set_study_user_attr(storage.get_study_id_from_name("faults"), "after", 1)
    waited = time.monotonic() - started
    assert waited < 25, waited  # Optuna alone waits out its 30 s grace period in silence
    err = capsys.readouterr().err
    assert f"{lock.name}" in err and "stale" in err, err
    assert not lock.exists() and sweep_storage.load_study(str(path), "faults").user_attrs["after"] == 1


def test_sweep_repair_clears_a_stale_lock_and_says_so(sweep):
    cwd, env, path = sweep
    lock = _stale_lock(path, 3600)
    started = time.monotonic()
    fixed = run_app(["sweep-repair", str(path)], env, cwd)
    assert fixed.returncode == 0 and "intact" in fixed.stdout, fixed.stdout + fixed.stderr
    assert "stale" in fixed.stdout + fixed.stderr and not lock.exists()
    assert time.monotonic() - started < 25


def test_a_fresh_lock_is_a_live_writer_and_is_left_alone(sweep):
    cwd, env, path = sweep
    lock = _stale_lock(path, 1)
    assert journal.clear_stale_lock(path) is None and lock.exists()


WAIT_FOR_LOCK = """
import sys
from app import interrupts
from app.sweep.optuna import journal
interrupts.install()
print("waiting", flush=True)
try:
    with journal.locked(sys.argv[1]):
        print("acquired", flush=True)
except interrupts.Stopped as stop:
    sys.exit(stop.exit_code)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_waiting_for_the_lock_leaves_the_holders_lock(sweep, sig):
    """Another writer holds the journal's lock; a stop that reaches an agent waiting for it ends that
    agent (128+signal) and leaves the holder's lock in place. (Optuna's acquire releases the lock on any
    exception; its wait sits in an except clause, which is why a stop there does not reach that release.)"""
    cwd, env, path = sweep
    lock = _stale_lock(path, 0)  # a live writer's, mid-append
    proc = subprocess.Popen([sys.executable, "-c", WAIT_FOR_LOCK, str(path)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "waiting"
    time.sleep(1.0)  # inside the wait loop
    assert proc.poll() is None
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert "acquired" not in out and lock.exists()


# --------------------------------------------------------------------------------------------
# 5. Damaged state: run logs read by sync and report
# --------------------------------------------------------------------------------------------

@pytest.fixture
def runs_copy(finished_run, tmp_path):
    cwd, _ = finished_run
    [folder] = [f for f in runlog.find(cwd / "runs") if f.name.endswith("done0001")]
    dest = tmp_path / "runs" / "wandb" / folder.name
    shutil.copytree(folder, dest, symlinks=True)
    return tmp_path / "runs", next(dest.glob("run-*.wandb"))


def break_log(log: Path, how: str) -> None:
    blob = bytearray(log.read_bytes())
    if how == "flipped-byte":
        blob[-200] ^= 0xFF
    elif how == "zero-bytes":
        blob = bytearray()
    elif how == "not-a-log":
        blob = bytearray(b"hello" * 100)
    elif how == "cut-mid-chunk":
        blob = blob[: len(blob) - 37]
    log.write_bytes(bytes(blob))
    hour_ago = time.time() - 3600
    os.utime(log, (hour_ago, hour_ago))  # copied from elsewhere with its times: not a live run


@pytest.mark.parametrize("how, says", [
    ("flipped-byte", "damaged: checksum mismatch"),
    ("zero-bytes", "skipped (empty"),
    ("not-a-log", "not a W&B run log"),
    ("cut-mid-chunk", "would upload"),
])
def test_sync_dry_run_survives_a_damaged_log(runs_copy, tmp_path, how, says):
    root, log = runs_copy
    break_log(log, how)
    before = tree(root)
    proc = run_app(["sync", "--dry-run", str(root)], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert says in proc.stdout, proc.stdout
    assert tree(root) == before


@pytest.mark.parametrize("how, says", [
    ("flipped-byte", "damaged log"),
    ("zero-bytes", "empty log (no W&B record yet)"),
    ("not-a-log", "not a W&B run log"),
    ("cut-mid-chunk", "report written"),  # a log cut at its end reads as a run without an end, not damage
])
def test_report_survives_a_damaged_log(runs_copy, tmp_path, how, says):
    root, log = runs_copy
    break_log(log, how)
    proc = run_app(["report", str(root), "--out", str(tmp_path / "report")], clean_env(tmp_path), tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    if proc.returncode == 2:
        assert len(error_lines(proc.stderr)) == 1
    assert says in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "killed" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# 6. Archives from elsewhere (bundle load): refused before anything is written or loaded
# --------------------------------------------------------------------------------------------

def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def make_bundle(path: Path, members: list[tuple], listed: list[str] | None = None, manifest: bytes | None = None):
    files = {i.name: hashlib.sha256(d).hexdigest() for i, d in members if i.type == tarfile.REGTYPE}
    if listed is not None:
        files = {k: v for k, v in files.items() if k in listed}
    blob = manifest if manifest is not None else json.dumps(
        {"image": "faults-never:loaded", "image_id": "sha256:0", "files": files}).encode()
    with tarfile.open(path, "w") as tar:
        for info, data in [*members, member("bundle.json", blob)]:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)


IMAGE = member("image.tar", b"not really an image")
BUNDLES = {
    "absolute path": ([IMAGE, member("/tmp/faults-escape/owned", b"x")], "unsafe path"),
    "dot-dot": ([IMAGE, member("project/../../escape", b"x")], "unsafe path"),
    "dot-dot at the start": ([IMAGE, member("../escape", b"x")], "unsafe path"),
    "symlink": ([IMAGE, member("project/link", kind=tarfile.SYMTYPE, link="/etc/passwd")], "is a link"),
    "hard link": ([IMAGE, member("project/hard", kind=tarfile.LNKTYPE, link="image.tar")], "is a link"),
    "device": ([IMAGE, member("project/dev", kind=tarfile.CHRTYPE)], "device or fifo"),
    "fifo": ([IMAGE, member("project/fifo", kind=tarfile.FIFOTYPE)], "device or fifo"),
    "twice": ([IMAGE, member("project/a", b"1"), member("project/a", b"2")], "appears twice"),
    "backslash": ([IMAGE, member("project\\..\\x", b"1")], "unsafe path"),
}


@pytest.mark.parametrize("case", list(BUNDLES))
def test_a_hostile_bundle_member_is_refused_before_anything_is_written(tmp_path, case):
    members, says = BUNDLES[case]
    archive = tmp_path / "b.tar"
    make_bundle(archive, members)
    into = tmp_path / "into"
    refused(run_app(["bundle", "load", str(archive), "--into", str(into)], clean_env(tmp_path), tmp_path), says)
    assert not into.exists() and not Path("/tmp/faults-escape").exists() and not (tmp_path / "escape").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"b.tar", "wandb-config", "wandb-cache"}


@pytest.mark.parametrize("case, listed, manifest, says", [
    ("unlisted member", ["image.tar"], None, "is not in bundle.json"),
    ("manifest not JSON", None, b"{not json", "is not a bundle manifest"),
    ("manifest lists outside", None, json.dumps({"image": "x", "image_id": "y",
                                                 "files": {"image.tar": "0", "etc/passwd": "0"}}).encode(), "outside"),
    ("sha mismatch", None, json.dumps({"image": "x", "image_id": "y",
                                       "files": {"image.tar": "0" * 64}}).encode(), "damaged (sha256 differs)"),
])
def test_a_bundle_whose_manifest_does_not_match_is_refused(tmp_path, case, listed, manifest, says):
    archive = tmp_path / "b.tar"
    make_bundle(archive, [IMAGE, *([member("project/extra", b"x")] if listed else [])], listed=listed, manifest=manifest)
    into = tmp_path / "into"
    refused(run_app(["bundle", "load", str(archive), "--into", str(into)], clean_env(tmp_path), tmp_path), says)
    assert not into.exists()


def test_a_truncated_bundle_is_refused(tmp_path):
    archive = tmp_path / "b.tar"
    make_bundle(archive, [IMAGE, member("project/data/big", bytes(200_000))])
    archive.write_bytes(archive.read_bytes()[:100_000])
    into = tmp_path / "into"
    refused(run_app(["bundle", "load", str(archive), "--into", str(into)], clean_env(tmp_path), tmp_path))
    assert not into.exists()


def test_a_bundle_bigger_than_the_free_space_or_the_cap_is_refused(tmp_path, monkeypatch):
    from app.container import bundle
    from app.errors import UserError

    archive = tmp_path / "b.tar"
    make_bundle(archive, [IMAGE, member("project/data/big", bytes(300_000))])
    into = tmp_path / "into"
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(bundle, "FREE_MARGIN", free)  # the data then needs more than what is free
    with pytest.raises(UserError, match="GB are free"):
        bundle.load(archive, into)
    monkeypatch.setattr(bundle, "FREE_MARGIN", 0)
    monkeypatch.setattr(bundle, "MAX_BYTES", 100_000)
    with pytest.raises(UserError, match="add up to over"):
        bundle.load(archive, into)
    assert not into.exists()


@pytest.mark.parametrize("long_name", [
    "project/sweeps/" + "x" * 250 + ".yaml",  # 255 bytes: no room for the name written beside it
    "project/data/MNIST/raw/" + "é" * 120,  # 240 bytes in UTF-8 (120 characters)
    "project/" + "y" * 300,
    "project/" + "/".join(["z" * 200] * 5),  # each folder's name fits the file system; the whole is over 1000
], ids=["at-the-limit", "multibyte", "over-the-limit", "over-a-bundles-limit"])
def test_a_bundle_member_name_too_long_for_the_file_system_is_refused_before_docker_load(tmp_path, long_name):
    archive = tmp_path / "b.tar"
    make_bundle(archive, [IMAGE, member("project/README.md", b"readme"), member(long_name, b"method: grid\n")])
    into = tmp_path / "into"
    refused(run_app(["bundle", "load", str(archive), "--into", str(into)], clean_env(tmp_path), tmp_path),
            "too long")
    assert not into.exists()  # all or nothing: not even the short member was written


@pytest.mark.parametrize("how", ["a-file", "under-a-file", "immutable"])
def test_report_out_that_cannot_be_written_is_refused_before_rendering(finished_run, tmp_path, how):
    cwd, _ = finished_run
    out = tmp_path / "report"
    if how == "a-file":
        out.write_text("a file")
    elif how == "under-a-file":
        (tmp_path / "file").write_text("a file")
        out = tmp_path / "file" / "report"
    else:
        out.mkdir()
        undo = _read_only(out, "immutable")
    try:
        refused(run_app(["report", str(cwd / "runs"), "--out", str(out)], clean_env(tmp_path), tmp_path),
                "--out", str(out))
    finally:
        if how == "immutable":
            undo()


def test_a_group_name_too_long_for_a_file_name_still_reports(finished_run, tmp_path, small_data):
    cwd = tmp_path
    env = clean_env(cwd, DATA_DIR=str(small_data), OUTPUT_DIR=str(cwd / "outputs"), WANDB_DIR=str(cwd / "runs"),
                    WANDB_RUN_GROUP="g" * 300, **SETTLE)
    made = run_app(["train"], env, cwd, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    proc = run_app(["report", str(cwd / "runs"), "--out", str(cwd / "report")], clean_env(cwd), cwd)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    names = [p.name for p in (cwd / "report").iterdir()]
    assert all(len(n.encode()) <= 255 for n in names) and any(n.endswith("-curves.svg") for n in names), names


# --------------------------------------------------------------------------------------------
# 7. Untrusted YAML size
# --------------------------------------------------------------------------------------------

def big_grid() -> str:
    keys = ["epochs", "batch_size", "seed", "train_stride", "log_interval", "watch_log_freq", "val_size"]
    values = ", ".join(str(i + 1) for i in range(40))
    return "method: grid\nparameters:\n" + "".join(f"  {k}:\n    values: [{values}]\n" for k in keys)


def alias_bomb() -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for name in "bcdefghi":
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text + "method: grid\nparameters: {epochs: {values: *i}}\n"


YAMLS = {
    "grid of 40^7 points": (big_grid(), "grid has 1.64e+11 points"),
    "alias bomb": (alias_bomb(), "anchors and aliases"),
    "alias that contains itself": ("method: grid\nparameters: &p {epochs: {values: [1, *p]}}\n", "anchors and aliases"),
    "over the size cap": ("method: grid\n#" + "x" * 300_000 + "\n", "over 256 KiB"),
    "binary": (bytes(range(256)) * 8, "not a text file"),
    "nested 5000 deep": ("[" * 5000 + "]" * 5000, ""),
    "a 100 kB method name": ("method: " + "m" * 100_000 + "\nparameters: {epochs: {values: [1]}}\n", "method='mmm"),
    "a 1000-character parameter name": ("method: grid\nparameters: {" + "p" * 1000 + ": {values: [1]}}\n",
                                        "not a training"),
    "invalid YAML": ("method: [grid\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(YAMLS))
def test_sweep_validate_refuses_an_oversized_yaml_in_one_short_line(tmp_path, case):
    text, says = YAMLS[case]
    path = tmp_path / "s.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.monotonic()
    proc = run_app(["sweep", "validate", str(path)], clean_env(tmp_path), tmp_path, timeout=60)
    refused(proc, says, width=200 + len(str(path)))
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("what", ["folder", "binary", "missing"])
def test_sweep_config_that_is_not_a_yaml_file_is_one_line_and_creates_no_journal(tmp_path, what):
    target = tmp_path / "cfg"
    if what == "folder":
        target.mkdir()
    elif what == "binary":
        target.write_bytes(bytes(range(256)) * 4)
    env = clean_env(tmp_path, SWEEP_CONFIG=str(target), WANDB_DIR=str(tmp_path / "runs"), WANDB_MODE="offline")
    refused(run_app(["offline-agent"], env, tmp_path), "sweep config")
    refused(run_app(["sweep", "validate", str(target)], env, tmp_path), "sweep config")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# 9. Waiting on nothing: sync against a W&B server that never answers
# --------------------------------------------------------------------------------------------

@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a black-holed host or proxy)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    sock.close()


def test_sync_gives_up_on_a_silent_server_after_the_stated_timeout(runs_copy, tmp_path, silent_server):
    root, log = runs_copy
    env = clean_env(tmp_path, WANDB_API_KEY="k" * 40, WANDB_BASE_URL=silent_server, SYNC_TIMEOUT_S="4")
    started = time.monotonic()
    proc = run_app(["sync", str(root)], env, tmp_path, timeout=120)
    took = time.monotonic() - started
    refused(proc, f"no answer from W&B at {silent_server} within 4 s", "SYNC_TIMEOUT_S")
    assert f"uploading 1 run(s) to {silent_server} (giving up after 4 s)" in proc.stdout
    assert took < 40, took
    assert not log.with_suffix(".wandb.synced").exists()  # nothing claimed as uploaded


@pytest.mark.parametrize("args, extra, says", [
    (["--timeout=-1"], {}, "--timeout=-1.0 must be a positive"),
    ([], {"SYNC_TIMEOUT_S": "soon"}, "SYNC_TIMEOUT_S='soon'"),
    ([], {"SYNC_TIMEOUT_S": "0"}, "SYNC_TIMEOUT_S='0'"),
])
def test_a_bad_sync_timeout_is_one_line(runs_copy, tmp_path, args, extra, says):
    root, _ = runs_copy
    env = clean_env(tmp_path, WANDB_API_KEY="k" * 40, **extra)
    refused(run_app(["sync", *args, str(root)], env, tmp_path), says)


# --------------------------------------------------------------------------------------------
# A sweep storage that accepts the connection and never answers (simulated on 127.0.0.1 only)
# --------------------------------------------------------------------------------------------

class SilentServer:
    """A TCP socket on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, silent

    def close(self):
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_db():
    server = SilentServer()
    yield server, f"postgresql://sweeper:secret-pw@127.0.0.1:{server.port}/sweeps"
    server.close()


def _silent_env(tmp_path, url, small_data):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(SWEEP_YAML)
    return clean_env(tmp_path, SWEEP_CONFIG=str(cfg), SWEEP_STORAGE=url, WANDB_DIR=str(tmp_path / "runs"),
                     WANDB_MODE="offline", OUTPUT_DIR=str(tmp_path / "outputs"), DATA_DIR=str(small_data),
                     ALLOW_CPU="true", VAL_SIZE="100", TRAIN_STRIDE="10")


SILENT_COMMANDS = {
    "offline-agent": [sys.executable, "-m", "app", "offline-agent"],
    "entrypoint": [sys.executable, "-m", "app.container.entrypoint"],
    "sweep-status": [sys.executable, "-m", "app", "sweep-status"],
}


@pytest.mark.parametrize("name", SILENT_COMMANDS)
def test_a_silent_database_is_one_line_within_the_connect_timeout(tmp_path, small_data, silent_db, name):
    server, url = silent_db
    env = _silent_env(tmp_path, url, small_data)
    proc = subprocess.run(SILENT_COMMANDS[name], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    line = refused(proc, "SWEEP_STORAGE=", "no answer", width=400)
    assert "secret-pw" not in proc.stdout + proc.stderr  # the password never reaches a log line
    assert server.accepted, "the command never reached the server"
    del line


def test_a_database_silent_mid_sweep_is_named_as_a_storage_problem(silent_db):
    """What an agent's later call on a database gone silent raises, as Optuna wraps it (its text blames
    the data): sweep_storage.storage_problem names the bounded wait instead; other errors are not storage problems."""
    import sqlalchemy
    from optuna.exceptions import StorageInternalError

    from app.sweep.optuna import storage as sweep_storage

    _, url = silent_db
    url = url.replace("postgresql://", "postgresql+psycopg2://")  # as plan.storage_url passes it
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **sweep_storage._bounded_postgres())
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
            engine.connect()
    finally:
        engine.dispose()
    try:
        raise StorageInternalError("An exception is raised during the commit.") from raised.value
    except StorageInternalError as wrapped:
        problem = sweep_storage.storage_problem(wrapped)
    assert problem == f"no answer from the database within {sweep_storage.CONNECT_TIMEOUT_S} s (connecting)", problem
    assert sweep_storage.storage_problem(StorageInternalError("invalid data")) is None
    assert sweep_storage.storage_problem(ValueError("a bug")) is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("name", ["offline-agent", "entrypoint"])
def test_a_stop_while_the_database_is_silent_is_a_stop(tmp_path, small_data, silent_db, name, sig):
    server, url = silent_db
    env = _silent_env(tmp_path, url, small_data)
    proc = subprocess.Popen(SILENT_COMMANDS[name], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not server.accepted and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert server.accepted, "the command never reached the server"
    time.sleep(0.3)  # waiting on the silent server now
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=8)  # well inside the connect timeout: the stop ended it
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{sig.name} did not stop it: {err[-2000:]}")
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and f"stopped by {sig.name}" in err, err[-3000:]
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
