"""runlog: reading back what real offline W&B runs recorded (config, history, summary, exit code)."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import clean_env

from app import runlog
from app.runlog import RunLogError

# Two real offline runs, written by the real wandb library in its own process (as a training run would).
WRITER = r"""
import sys, wandb
root = sys.argv[1]
big = "x" * 100_000  # the run record then spans several 32 KiB blocks: FIRST, MIDDLE and LAST chunks
run = wandb.init(project="runlog-test", dir=root + "/finished", mode="offline", id="rlfinish", group="g1", name="g1-17",
                 config={"a": 1, "nested": {"b": 2}, "big": big, "kernels": [16, 32]})
for i, step in enumerate(range(0, 500, 100)):
    run.log({"loss": 1.0 / (step + 1), "epoch": i // 2}, step=step)
run.log({"val_accuracy": 0.5, "epoch": 2}, step=450)
run.config.update({"a": 2}, allow_val_change=True)
run.summary["test_accuracy"] = 0.9
run.finish(exit_code=3)

run = wandb.init(project="runlog-test", dir=root + "/preempted", mode="offline", id="rlpreemp", config={"a": 1})
run.log({"loss": 2.0}, step=128)
run.mark_preempting()
run.finish(exit_code=143)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runlog")
    proc = subprocess.run([sys.executable, "-c", WRITER, str(root)], env=clean_env(root), cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def finished(runs: Path) -> Path:
    [folder] = runlog.find(runs / "finished")
    return folder


def test_find_from_any_level(runs: Path, finished: Path):
    assert finished.name.startswith("offline-run-") and finished.name.endswith("-rlfinish")
    assert runlog.find(runs / "finished" / "wandb") == [finished]
    assert runlog.find(finished) == [finished]
    assert len(runlog.find(runs)) == 2
    assert runlog.find(runs / "nothing-here") == []


def test_reads_config_history_summary_exit_code(finished: Path):
    run = runlog.read(finished)
    assert (run.run_id, run.project, run.group) == ("rlfinish", "runlog-test", "g1")
    assert run.config == {"a": 2, "nested": {"b": 2}, "big": "x" * 100_000, "kernels": [16, 32]}  # W&B's own keys dropped
    assert run.metric("loss") == [(s, pytest.approx(1.0 / (s + 1))) for s in range(0, 500, 100)]
    assert run.metric("val_accuracy") == [(450, 0.5)]
    assert [row["_step"] for row in run.history] == [0, 100, 200, 300, 400, 450]
    assert run.summary["test_accuracy"] == 0.9 and run.summary["loss"] == pytest.approx(1 / 401)
    assert run.exit_code == 3 and run.finished and not run.preempting
    assert run.name == "g1-17" and run.runtime is not None and run.runtime >= 0  # the report's trial number, seconds


def test_preempted_run(runs: Path):
    [folder] = runlog.find(runs / "preempted")
    run = runlog.read(folder)
    assert run.preempting and run.exit_code == 143
    assert run.metric("loss") == [(128, 2.0)]


def _copy_log(folder: Path, dest: Path, blob: bytes) -> Path:
    dest.mkdir()
    (dest / next(folder.glob("run-*.wandb")).name).write_bytes(blob)
    return dest


def test_a_log_cut_anywhere_reads_up_to_the_cut(finished: Path, tmp_path: Path):
    """A run killed mid-write leaves a partial log: what was written stays readable."""
    blob = next(finished.glob("run-*.wandb")).read_bytes()
    full = runlog.read(finished)
    unfinished_with_history = 0
    for i, cut in enumerate(range(100, len(blob), max(1, len(blob) // 150))):
        run = runlog.read(_copy_log(finished, tmp_path / str(i), blob[:cut]))
        assert run.history == full.history[:len(run.history)]
        assert run.exit_code in (None, 3)
        unfinished_with_history += run.exit_code is None and bool(run.history)
    assert unfinished_with_history > 0


def test_a_flipped_byte_is_skipped_and_flagged(finished: Path, tmp_path: Path):
    """A damaged block is skipped (its records dropped) and named; what is around it still reads."""
    blob = bytearray(next(finished.glob("run-*.wandb")).read_bytes())
    full = runlog.read(finished)
    blob[-300] ^= 0xFF  # past the run record (which spans the first blocks)
    run = runlog.read(_copy_log(finished, tmp_path / "flipped", bytes(blob)))
    assert run.damaged and "checksum mismatch at byte" in run.damaged[0]
    assert run.run_id == "rlfinish" and len(run.history) <= len(full.history)
    assert not full.damaged


def _chunk(kind: int, payload: bytes) -> bytes:
    return struct.pack("<IHB", zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF, len(payload), kind) + payload


@pytest.mark.parametrize("payload, note", [
    (b"\xff\xff\xff\xff not a protobuf", "does not decode"),
    (None, "is not JSON"),  # a valid record whose history value is not JSON
])
def test_a_checksummed_but_undecodable_record_is_skipped(finished: Path, tmp_path: Path, payload, note):
    from wandb.proto import wandb_internal_pb2 as pb

    if payload is None:
        rec = pb.Record()
        item = rec.history.item.add()
        item.key, item.value_json = "loss", "{not json"
        payload = rec.SerializeToString()
    blob = next(finished.glob("run-*.wandb")).read_bytes()
    head = blob[:len(runlog.HEADER) + 1]
    run = runlog.read(_copy_log(finished, tmp_path / "bad", head + _chunk(runlog.FULL, payload)))
    assert any(note in d for d in run.damaged), run.damaged


def test_an_endless_record_is_bounded(finished: Path, tmp_path: Path, monkeypatch):
    """FIRST then MIDDLE chunks forever: the reader gives the record up at MAX_RECORD, not at memory's end."""
    monkeypatch.setattr(runlog, "MAX_RECORD", 100_000)
    blob = next(finished.glob("run-*.wandb")).read_bytes()
    body = bytearray(blob[:len(runlog.HEADER) + 1])
    body += _chunk(runlog.FIRST, b"a" * 1000)
    while len(body) < 400_000:
        room = runlog.BLOCK - len(body) % runlog.BLOCK - runlog.CHUNK_HEADER
        body += _chunk(runlog.MIDDLE, b"b" * room) if room > 0 else b"\0" * (room + runlog.CHUNK_HEADER)
    run = runlog.read(_copy_log(finished, tmp_path / "endless", bytes(body)))
    assert any("over" in d for d in run.damaged), run.damaged


def test_a_zero_byte_log_is_empty_not_an_error(tmp_path: Path):
    (tmp_path / "run-abc.wandb").write_bytes(b"")
    run = runlog.read(tmp_path)
    assert run.empty and not run.run_id and not run.damaged


def test_not_a_run_log(tmp_path: Path):
    (tmp_path / "run-abc.wandb").write_bytes(b"hello world" * 100)
    with pytest.raises(RunLogError, match="is not a W&B run log"):
        runlog.read(tmp_path)
    with pytest.raises(RunLogError, match="no run-"):
        runlog.read(tmp_path / "empty")
