"""Stopping a run's process mid-training from a test: wait until its first epoch's checkpoint is written
(the signal then lands inside the next epoch), and find the ranks it started (GPUS_PER_TRIAL)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until `path` exists while `proc` runs; the test fails (and `proc` is killed) when it ends first or
    `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.communicate()[1] or ""
            pytest.fail(f"training ended (rc {proc.returncode}) before {path} appeared within {timeout} s:\n{err[-3000:]}")
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def started_ranks(pid: int) -> list[int]:
    """The ranks process `pid` started (torch.multiprocessing's spawned children; its resource tracker is none)."""
    found = []
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue  # ended meanwhile
    return found


def rank1(proc: subprocess.Popen, timeout: float = 120) -> int:
    """Rank 1 of the trial `proc` runs, once it is started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = started_ranks(proc.pid)
        if found:
            return found[0]
        time.sleep(0.05)
    proc.kill()
    pytest.fail("rank 1 was never started")


def gone(pid: int) -> bool:
    """`pid` no longer exists (a rank that was frozen, then killed and reaped)."""
    return not Path(f"/proc/{pid}").exists()
