"""Skip a sweep run whose parameters another agent is running or has finished.

W&B's sweep server can hand the same configuration to agents that ask at the same moment (most often
right after `docker compose up --scale agent=N` starts them together). Before training, a sweep run
(WANDB_SWEEP_ID set) claims its parameter set in a folder every agent mounts:

    <SWEEP_CLAIMS_DIR or $WANDB_DIR/.sweep-claims>/<sweep id>/<sha256 of the params>.json    the record
                                                                                  ...  .lock    its lock

The lock file is flock'ed for the whole run, so "someone is running these params" is a kernel fact that
disappears with the process (crash, kill -9, container removed) instead of a stale file. The record says
which run holds or finished the parameters. A run that finds the lock held, or a record finished by
another run, is a duplicate: it prints one line and exits 0 without training.

Why exit 0: the agent counts a non-zero exit as a failed run, and a few failures in its first minute
make it stop for good ("flapping"); exit 0 counts as a finished trial, and the agent asks for the next
configuration. The server has already counted the hand-out (against the grid point, and against
`run_cap`), so the skip is made visible instead of silent: the duplicate is recorded as a W&B run that
trains nothing, with job type and tag `duplicate` and `duplicate_of` (the run that has these values)
in its summary, and no metric, so bayes and hyperband never read it as a result. A random or bayes
sweep over discrete values can draw the same values twice; each such draw uses up one of `run_cap`
and shows up as one `duplicate` run (raise run_cap, or sweep those values as a grid, to train more).

A run that comes back with its own run id (a requeued, preempted run) owns its record and resumes.
A run that failed or was preempted gives its parameters up, so a later hand-out may retry them.

AGENT_START_STAGGER=SECONDS (optional) delays agent k's start by k x SECONDS (k = AGENT_INDEX from the
GPU slot claim), so agents started together don't ask the server at the same moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, MutableMapping

import yaml

from app import interrupts, runner, settings, sources
from app.config import KEYS, ConfigError, parse_cli
from app.errors import UserError

RUNNING, FINISHED, FAILED, PREEMPTED = "running", "finished", "failed", "preempted"


def sweep_params(environ: Mapping[str, str], argv: list[str]) -> dict[str, Any]:
    """The values W&B handed this run: the agent's param file, else the --key=value arguments."""
    path = settings.get("WANDB_SWEEP_PARAM_PATH", environ)
    if path and path.is_file():
        doc = yaml.safe_load(path.read_text()) or {}
        # the agent writes {key: {value: v}}; wandb's own bookkeeping keys start with "_"
        return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in doc.items() if not k.startswith("_")}
    try:
        return parse_cli(argv)
    except ConfigError:
        return {}


def key(params: Mapping[str, Any]) -> str:
    """Canonical JSON (sorted keys, no spaces) hashed: the same values in any order give the same key."""
    canonical = json.dumps(dict(params), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def claims_dir(environ: Mapping[str, str]) -> Path:
    return settings.get("SWEEP_CLAIMS_DIR", environ) or settings.runs_root(environ) / ".sweep-claims"


@dataclass
class Claim:
    sweep_id: str
    run_id: str
    params: dict[str, Any]
    record: Path
    duplicate_of: str | None = None  # set when another run holds or finished these params
    other_state: str = ""
    _fd: int | None = field(default=None, repr=False)

    def _write(self, state: str) -> None:
        doc = {"sweep_id": self.sweep_id, "run_id": self.run_id, "state": state, "params": self.params,
               "host": socket.gethostname(), "cuda_visible_devices": settings.get("CUDA_VISIBLE_DEVICES") or "",
               "updated": time.time()}
        # a random name: pids repeat across containers sharing the volume (a requeued run id can be
        # claimed by two agents at once)
        tmp = self.record.with_name(f"{self.record.name}.{os.urandom(6).hex()}.tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True))
        os.replace(tmp, self.record)  # readers never see half a record

    def close(self, state: str) -> None:
        """Record how the run ended and drop the lock (FINISHED keeps the params taken for good)."""
        if self._fd is None:
            return
        try:
            self._write(state)
        finally:
            os.close(self._fd)
            self._fd = None


def _read(record: Path) -> dict[str, Any]:
    try:
        return json.loads(record.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def claim(sweep_id: str, run_id: str, params: dict[str, Any], folder: Path) -> Claim:
    """Take the params for this run, or say which run has them."""
    base = folder / sweep_id.replace("/", "_")
    try:
        base.mkdir(parents=True, exist_ok=True)
        h = key(params)
        record = base / f"{h}.json"
        c = Claim(sweep_id, run_id, params, record)
        fd = os.open(base / f"{h}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # the lock holder writes its record right after locking: a moment's wait gets its run id
            for _ in range(20):
                doc = _read(record)
                if doc.get("state") == RUNNING:
                    break
                time.sleep(0.05)
            c.duplicate_of, c.other_state = doc.get("run_id") or "another run", doc.get("state") or RUNNING
            return c
        doc = _read(record)
        if doc.get("state") == FINISHED and doc.get("run_id") != run_id:
            os.close(fd)
            c.duplicate_of, c.other_state = doc["run_id"], FINISHED
            return c
        c._fd = fd
        c._write(RUNNING)
        return c
    except OSError as exc:
        raise UserError(f"SWEEP_CLAIMS_DIR={str(folder)!r} is not usable for sweep claims ({exc.strerror or exc}); "
                        "mount a shared writable folder there") from None


def record_orphan(sweep_id: str, run_id: str, params: dict[str, Any], folder: Path) -> bool:
    """After a stop ended the run's process: record it orphaned (the next agent resumes it) unless how it
    ended is on record (finished, preempted: W&B requeues it, orphaned) or a live run holds its values.
    For a run killed before it could record itself: still starting, or killed outright. True: recorded."""
    base = folder / sweep_id.replace("/", "_")
    base.mkdir(parents=True, exist_ok=True)
    h = key(params)
    fd = os.open(base / f"{h}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False  # a live run has these values
    if _read(base / f"{h}.json").get("state") in (FINISHED, PREEMPTED, runner.ORPHANED):
        os.close(fd)
        return False
    # running (its process killed), failed (W&B's service gone under it) or never claimed (still starting)
    Claim(sweep_id, run_id, params, base / f"{h}.json", _fd=fd).close(runner.ORPHANED)
    return True


def handed_params(args: Mapping[str, Any]) -> dict[str, Any]:
    """The values of a hand-out ({key: {"value": v}}, as W&B sends them), as the run's claim keys them."""
    return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in args.items() if k in KEYS}


@contextlib.contextmanager
def guard(environ: Mapping[str, str], argv: list[str]) -> Iterator[Claim | None]:
    """Around one run: None outside a sweep; a Claim whose duplicate_of says whether to skip.

    The caller marks a clean finish with claim.close(FINISHED); leaving the block any other way
    records FAILED (or PREEMPTED, when the caller says so) and frees the params for a retry.
    """
    sweep_id = settings.get("WANDB_SWEEP_ID", environ)
    run_id = settings.get("WANDB_RUN_ID", environ)  # checked by the run's preflight before this
    if not sweep_id or not run_id or not settings.get("SWEEP_DEDUPE", environ):
        yield None
        return
    params = {k: v for k, v in sweep_params(environ, argv).items() if k in KEYS}
    c = claim(sweep_id, run_id, params, claims_dir(environ))
    try:
        yield c
    except interrupts.Stopped as stop:
        # stopped before training (or while W&B opened the run): W&B requeues it only if it was told
        c.close(PREEMPTED if getattr(stop, "told", False) else runner.ORPHANED)
        raise
    finally:
        c.close(FAILED)


def skip_message(c: Claim) -> str:
    what = "is running" if c.other_state == RUNNING else "already finished"
    return (f"skipping duplicate sweep run {c.run_id}: run {c.duplicate_of} {what} the same parameters "
            f"{json.dumps(c.params, sort_keys=True)}")


def record_duplicate(c: Claim, mode: str) -> None:
    """The skipped run as a finished W&B run with no metric: tagged and job type `duplicate`,
    `duplicate_of` in its summary (best effort: a failure here never turns the skip into a failure)."""
    import wandb

    try:
        # no id=: under `wandb agent` the run id comes from WANDB_RUN_ID, and passing it warns
        run = wandb.init(mode=mode, job_type="duplicate", tags=["duplicate"], config=c.params,
                         notes=f"skipped: run {c.duplicate_of} {c.other_state} the same parameters")
        run.summary.update({"duplicate_of": c.duplicate_of, "duplicate_state": c.other_state})
        run.finish(exit_code=0)
    except Exception as exc:  # wandb's own errors (network, settings) are many types; the skip stands
        print(f"note: could not record the duplicate run in W&B ({type(exc).__name__}: {str(exc)[:120]})",
              file=sys.stderr)


def stagger(environ: Mapping[str, str]) -> float:
    """Seconds this agent waits before starting: AGENT_INDEX x AGENT_START_STAGGER."""
    step = settings.get("AGENT_START_STAGGER", environ)
    return step * settings.get("AGENT_INDEX", environ) if step else 0.0


def wait_stagger(environ: Mapping[str, str]) -> None:
    delay = stagger(environ)
    if delay > 0:
        print(f"agent start staggered by {delay:g}s (AGENT_INDEX x AGENT_START_STAGGER)", file=sys.stderr, flush=True)
        time.sleep(delay)


def run_once(args: list[str], environ: MutableMapping[str, str], prepare: Callable[[], runner.Start],
             last: bool = True, on_epoch=None, dotenv_path: str | None = None) -> int:
    """runner.run for a run `wandb agent` may have handed out twice: it first claims its parameters, and
    a run whose parameters another agent has is skipped (exit 0, recorded in the sweep) instead of trained.
    The claim comes before `prepare()` (runner.prepare: settings, checks, imports): a stop at any point
    after it leaves a record of the run, so the run is not lost when W&B was not told. `dotenv_path`: the
    `.env` prepare() reads; the claim reads SWEEP_DEDUPE, SWEEP_CLAIMS_DIR and WANDB_DIR there too."""
    seen = dict(environ)
    if dotenv_path and os.path.exists(dotenv_path):
        sources.apply_dotenv(seen, dotenv_path)  # a copy: prepare() reads the file itself, naming it in errors
    with guard(seen, args) as taken:
        start = prepare()
        if taken and taken.duplicate_of:
            print(skip_message(taken), file=sys.stderr)
            record_duplicate(taken, start.ready.mode)  # visible in the sweep: it used up a hand-out
            return 0  # exit 0: a finished trial to the agent, not a failure that could stop it
        return runner.run(start, last, on_epoch, claim=taken)
