"""Each run an agent hands out, recorded by the agent before the run's process starts: a stop at any moment
loses no run.

A job-wide stop (a plain `scancel`: every process of the task at once) ends W&B's service with the run, so
W&B is never told the run was preempting and never hands it out again. A run that gets as far as its
checkpoint records itself orphaned (app.sweep.wandb.dedupe), and the next agent resumes it
(app.sweep.wandb.orphans). One killed before it could record anything (its process not yet started,
Python's imports, `wandb.init`, or killed outright) would leave no trace. So the agent writes

    <claims folder>/<sweep id>/handed-out/<run id>.json     {run_id, params, host, pid}

before it starts the run's process, and holds it flock'ed (a lock the agent owns, not the run) while the
process lives. Once the process ended, the agent settles it: after a stop, a run whose end is not on
record is recorded orphaned (`dedupe.record_orphan`); without a stop nothing changes (a run that crashed
is lost as under `wandb agent`: W&B marks it crashed). A hand-out whose lock is free was left by an agent
killed before it could settle (Slurm's SIGKILL after KillWait): the next agent on the sweep settles it as
stopped (`settle_abandoned`, first thing in `orphans.resume_all`).

    h = handouts.record(claims, sweep_id, run_id, params)     # before the run's process starts
    ...                                                        # the run
    handouts.settle(h, stopped=True)                          # after it ended: orphaned unless on record
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.sweep.wandb import dedupe


@dataclass
class Handout:
    """A run handed out to this agent, its record held (flock) until `settle`."""

    folder: Path  # the claims folder
    sweep_id: str
    run_id: str
    params: dict[str, Any]
    path: Path
    fd: int
    process: Any = field(default=None, repr=False)  # the run's process (a Popen), once started


def folder_of(claims: Path, sweep_id: str) -> Path:
    return claims / sweep_id.replace("/", "_") / "handed-out"


def record(claims: Path, sweep_id: str, run_id: str, params: dict[str, Any]) -> Handout | None:
    """The hand-out on record and held by this process; None when another agent holds this run already."""
    path = folder_of(claims, sweep_id) / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    doc = {"sweep_id": sweep_id, "run_id": run_id, "params": params, "host": socket.gethostname(), "pid": os.getpid()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(doc, sort_keys=True).encode())  # read only by whoever takes the lock: never half
    return Handout(claims, sweep_id, run_id, params, path, fd)


def settle(h: Handout, stopped: bool) -> None:
    """The run's process has ended (or never started): after a stop, orphaned unless its end is on record."""
    try:
        if stopped and dedupe.record_orphan(h.sweep_id, h.run_id, h.params, h.folder):
            print(f"[sweep] run {h.run_id} was stopped before it could record itself: W&B was not told, "
                  "the next agent on this sweep resumes it", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(h.path)  # still under the lock: nobody settles it twice
        os.close(h.fd)


def settle_abandoned(claims: Path, sweep_id: str) -> None:
    """Settle, as stopped, every hand-out of the sweep whose agent is gone without settling it."""
    folder = folder_of(claims, sweep_id)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # settled meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its agent is alive
        try:
            doc = json.loads(os.read(fd, 1 << 20) or b"{}") if os.fstat(fd).st_nlink else None
        except json.JSONDecodeError:
            doc = {}
        if doc is None:  # settled between our open and our lock
            os.close(fd)
        elif not doc.get("params"):  # its agent died while writing it: nothing was started
            settle(Handout(claims, sweep_id, path.stem, {}, path, fd), stopped=False)
        else:
            settle(Handout(claims, sweep_id, doc.get("run_id", path.stem), doc["params"], path, fd), stopped=True)
