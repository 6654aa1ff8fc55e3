"""Runs a job-wide stop took from W&B: the next agent on the sweep resumes them before W&B's new runs.

A plain `scancel` (or anything else that signals every process of a job: a pod's or a container's whole
process group) ends W&B's own service together with the run. The run still checkpoints, but W&B never
hears that it was preempting, so W&B's sweep never hands it out again and its parameters would never be
trained. The run's claim (app.sweep.wandb.dedupe) records that: state `orphaned`, with the run id and
the parameters. An agent starting on the sweep, and an agent whose sweep has nothing more for it, first
resumes each such run: the same run id and parameters, from its checkpoint (`wandb.init(resume="allow")`
continues the run in W&B). W&B's own fix for preemption (`mark_preempting`, then a requeue by the sweep)
needs the service alive at the stop; this needs only the claims folder every agent already shares.

Two agents never resume the same run: the one holding `<params>.resume` (flock, dropped with the
process) resumes it, and reads the record again under that lock (another may have just finished it).
Resumed, the run claims its parameters as any sweep run does; stopped again, it is recorded again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from app import interrupts, settings
from app.runner import ORPHANED
from app.sweep.wandb import handouts
from app.sweep.wandb.dedupe import _read, claims_dir


def say(msg: str) -> None:
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def sweep_folder(environ: Mapping[str, str], sweep_id: str) -> Path:
    """The sweep's claims, as its runs name it (WANDB_SWEEP_ID: the sweep's own id, no entity/project)."""
    return claims_dir(environ) / sweep_id.rsplit("/", 1)[-1]


@contextlib.contextmanager
def take(record: Path) -> Iterator[dict[str, Any] | None]:
    """The orphaned run's record while this agent holds it for resuming; None if another agent does,
    or the run is no longer orphaned."""
    try:
        fd = os.open(record.with_suffix(".resume"), os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        yield None  # the folder went away or is read-only here: another agent's to resume
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        doc = _read(record)
        yield doc if doc.get("state") == ORPHANED and doc.get("run_id") else None
    finally:
        os.close(fd)


def resume_all(environ: Mapping[str, str], sweep_id: str, resume: Callable[[dict[str, Any]], int]) -> int:
    """Resume every orphaned run of the sweep, one at a time: 0, or the first stop's 128+signal."""
    folder = sweep_folder(environ, sweep_id)
    # runs whose agent was killed before it could settle them (app.sweep.wandb.handouts): orphaned first
    handouts.settle_abandoned(claims_dir(environ), folder.name)
    for record in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        if _read(record).get("state") != ORPHANED:
            continue
        with take(record) as doc:
            if doc is None:
                continue
            say(f"resuming run {doc['run_id']} of sweep {sweep_id}: it was stopped and W&B was not told, "
                "so W&B will not hand it out again")
            code = resume(doc)
            if code >= 128 or interrupts.requested():
                return code if code >= 128 else 128 + interrupts.requested()
    return 0


def sweep_args(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The run's parameters as W&B hands them out ({key: {"value": v}})."""
    return {k: {"value": v} for k, v in doc.get("params", {}).items()}


def resume_in_child(doc: Mapping[str, Any], environ: Mapping[str, str], sweep: str) -> int:
    """The run as `wandb agent` would start it: `python -m app train --key=value ...` with the run's id,
    its sweep and W&B's parameter file; its exit code (128+signal when this agent was stopped meanwhile)."""
    parts = sweep.split("/")
    sweep_id, run_id = parts[-1], doc["run_id"]
    params = settings.runs_root(environ) / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    params.write_text(yaml.safe_dump(sweep_args(doc)))
    run_env = {**environ, "WANDB_RUN_ID": run_id, "WANDB_SWEEP_ID": sweep_id, "WANDB_SWEEP_PARAM_PATH": str(params)}
    if len(parts) == 3:
        run_env.update(WANDB_ENTITY=parts[0], WANDB_PROJECT=parts[1])
    args = [f"--{k}={v}" for k, v in doc.get("params", {}).items()]
    # held while the run lives, as `wandb agent`'s hand-outs are: a stop that kills it before it records
    # itself, or kills this agent too, leaves it orphaned again, never lost
    handout = handouts.record(claims_dir(environ), sweep_id, run_id, doc.get("params", {}))
    try:
        code, stopped = interrupts.run_forwarding([sys.executable, "-m", "app", "train", *args], run_env)
    finally:
        if handout:
            handouts.settle(handout, stopped=bool(interrupts.requested()))
    if stopped:
        return 128 + stopped
    return code if code >= 0 else 128 - code
