"""`python -m app sync`: which offline runs it uploads, and runs folders that survive being copied.

The runs are made by the real wandb library in offline mode (no training needed to make a run); the
upload itself needs a W&B server, so these tests stop at --dry-run and check it against the real
`wandb sync --dry-run`, which applies W&B's own rules to the same folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env, error_lines, run_app

from app import runlog
from app.runs.sync import scan
from app.tracking import materialize_links

MAKE_RUNS = r"""
import os, signal, sys, wandb
root, finished = sys.argv[1], int(sys.argv[2])
for i in range(finished):
    run = wandb.init(project="sync-test", dir=root, mode="offline", group="g", config={"learning_rate": 0.01 * (i + 1)})
    for step in range(3):
        run.log({"loss": 1.0 / (step + 1), "val_accuracy": 0.5 + 0.1 * step}, step=step)
    run.finish()
if sys.argv[3] == "kill":  # a run that dies mid-way: no exit record, as after kill -9
    import glob, time
    run = wandb.init(project="sync-test", dir=root, mode="offline", config={"learning_rate": 0.5})
    log = glob.glob(os.path.join(run.dir, "..", "run-*.wandb"))[0]
    # wandb-core writes its log in 32 KiB blocks (or every ~10 s): fill one, so the kill leaves records behind
    for step in range(600):
        run.log({"loss": 2.0, "note": "x" * 4000}, step=step)
        if os.path.getsize(log) > 7:
            break
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def make_runs(tmp: Path, root: Path, finished: int, kill: bool) -> None:
    env = clean_env(tmp, WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-c", MAKE_RUNS, str(root), str(finished), "kill" if kill else "-"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == (-signal.SIGKILL if kill else 0), proc.stderr[-2000:]


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory) -> Path:
    """4 finished offline runs, 1 killed long ago (old log), 1 killed just now, 1 killed before it wrote anything."""
    tmp = tmp_path_factory.mktemp("sync")
    root = tmp / "runs"
    make_runs(tmp, root, finished=4, kill=True)
    killed = [r for r in scan(root) if not r.finished]
    assert len(killed) == 1
    old = time.time() - 3600
    os.utime(killed[0].log, (old, old))  # killed an hour ago: safe to upload as a crashed run
    make_runs(tmp, root, finished=0, kill=True)  # killed just now: maybe still being written
    # killed before W&B wrote anything: what kill -9 right after wandb.init leaves (the 7-byte header)
    empty = root / "wandb" / killed[0].folder.name.replace(killed[0].folder.name[-8:], "emptyrun")
    shutil.copytree(killed[0].folder, empty, symlinks=True)
    old_log = next(empty.glob("run-*.wandb"))
    (empty / "run-emptyrun.wandb").write_bytes(old_log.read_bytes()[:7])
    old_log.unlink()
    os.utime(empty / "run-emptyrun.wandb", (old, old))
    return root


def wandb_would_sync(root: Path, tmp: Path) -> set[str]:
    """The run folders the real `wandb sync --dry-run` lists for ROOT/wandb."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(wandb_cli), "sync", "--dry-run", "--verbose", str(root / "wandb")],
                          env=clean_env(tmp), capture_output=True, text=True, timeout=120, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"(\S*offline-run-[\w-]+)/run-\w+\.wandb", proc.stdout + proc.stderr)
    return {Path(p).name for p in listed}


def test_dry_run_lists_exactly_the_runs_not_yet_uploaded(runs_folder, tmp_path):
    runs = scan(runs_folder)
    assert len(runs) == 7 and [r.empty for r in runs].count(True) == 1
    # `wandb sync` marks an uploaded run with run-<id>.wandb.synced beside its log: mark two as uploaded
    done = [r for r in runs if r.finished][:2]
    for r in done:
        r.log.with_suffix(".wandb.synced").touch()
    live = [r for r in runs if r.live]
    assert len(live) == 1
    empty = [r for r in runs if r.empty]

    proc = run_app(["sync", "--dry-run", str(runs_folder)], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "found 7 offline run(s)" in out and "2 already synced, 1 still being written, 1 empty, 0 unreadable, 3 to upload" in out
    would = {Path(line.split(": ", 1)[1].split()[0]).name for line in out.splitlines() if "would upload: " in line}
    expected = {r.folder.name for r in runs if r not in done and r not in live and r not in empty}
    assert would == expected
    assert "(no exit record: the run was killed; uploads as crashed)" in out
    assert "skipped (empty: W&B wrote no run record" in out
    # W&B's own rules agree: it lists the same runs, plus the live and the empty one it cannot tell apart
    assert wandb_would_sync(runs_folder, tmp_path) == expected | {live[0].folder.name, empty[0].folder.name}

    # after an interruption the markers are the record: a run uploaded since drops off the list
    next(r for r in runs if r.folder.name in expected and r.finished).log.with_suffix(".wandb.synced").touch()
    again = run_app(["sync", "--dry-run", str(runs_folder)], clean_env(tmp_path), tmp_path)
    assert "3 already synced, 1 still being written, 1 empty, 0 unreadable, 2 to upload" in again.stdout
    unfinished = run_app(["sync", "--dry-run", "--include-unfinished", str(runs_folder)], clean_env(tmp_path), tmp_path)
    assert "3 already synced, 0 still being written, 1 empty, 0 unreadable, 3 to upload" in unfinished.stdout
    for r in runs:
        r.log.with_suffix(".wandb.synced").unlink(missing_ok=True)


def test_uploading_needs_an_api_key_and_says_so_in_one_line(runs_folder, tmp_path):
    proc = run_app(["sync", str(runs_folder)], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [line for line in proc.stderr.splitlines() if line.strip()]
    assert "WANDB_API_KEY" in proc.stderr
    missing = run_app(["sync", "--dry-run", str(tmp_path / "nowhere")], clean_env(tmp_path), tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_copied_runs_folder_is_self_contained(runs_folder, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(runs_folder, source, symlinks=True)
    folders = runlog.find(source)
    # wandb-core links logs/debug-core.log to its cache folder (~/.cache inside a container): dead elsewhere
    outside = [p for f in folders for p in f.rglob("*") if p.is_symlink() and not p.resolve().is_relative_to(f)]
    assert outside, "expected wandb's debug-core.log link; if W&B stopped making it, materialize_links is moot"
    before = {f.name: runlog.read(f) for f in folders}
    for f in folders:
        materialize_links(f)  # what the offline sweep does after each trial

    copy = tmp_path / "elsewhere" / "runs"
    shutil.copytree(source, copy, symlinks=True)  # as tar, docker cp or cp -a would: links stay links
    shutil.rmtree(source)
    copied = runlog.find(copy)
    assert {f.name for f in copied} == set(before)
    for f in copied:
        assert not [p for p in f.rglob("*") if p.is_symlink()], f
        assert (f / "logs" / "debug-core.log").is_file()
        run = runlog.read(f)
        assert run.config == before[f.name].config and run.history == before[f.name].history
        assert run.exit_code == before[f.name].exit_code
