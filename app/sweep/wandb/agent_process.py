"""`wandb agent` as W&B's own command runs it, made safe for a job-wide stop.

    python -m app.sweep.wandb.agent_process agent --forward-signals ENTITY/PROJECT/SWEEP

A job-wide stop (a plain `scancel`, a pod's or a container's whole process group) signals every process at
once: the runs, W&B's service, this agent, and the entrypoint and batch script above it, which pass their
own copy on. W&B's command line, run here as is (`wandb.cli.cli`), gets three things around it:

- One stop is one stop. `wandb agent` takes each further signal as "harder": the second SIGTERMs its runs
  again, the third SIGKILLs them, mid-checkpoint or before a starting run could record itself (the run was
  then lost for good). Here only the first SIGTERM/SIGINT starts W&B's shutdown (wait for the runs to
  end); W&B still passes every copy to the runs, and nothing more happens. What ends a run that will not
  stop is Slurm's or Docker's SIGKILL after their grace time.
- Every run handed out is on record before its process starts, held by this process (app.sweep.wandb.
  handouts), and settled once the process ended: after a stop, a run that did not record its end is
  recorded orphaned, and the next agent on the sweep resumes it. From the server's answer to the run's
  process being started a stop waits (at most HOLD_S), so no hand-out falls between the two.
- A lost service in one line: W&B's exit handler and its finalizer thread print `ConnectionResetError`
  and asyncio's `socket.send() raised exception` as tracebacks, although nothing failed: the stop itself
  is said by the entrypoint. Exactly those are muted (app.interrupts); every other error prints.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

from app import interrupts, settings
from app.sweep.wandb import dedupe, handouts

HOLD_S = 5.0  # the longest a stop waits for the server's answer and the run's start (a hung server: no longer)
SETTLE_S = 20.0  # at the end, the longest wait for runs still ending (inside Slurm's KillWait, 30 s by default)
_state: dict[str, Any] = {"holding": 0, "pending": None, "late": False}
_open: dict[str, handouts.Handout] = {}  # this agent's hand-outs not yet settled, by run id


def _shutdown(signum: int) -> BaseException:
    from wandb.wandb_agent import ShutdownSignal

    return ShutdownSignal(signum)


def _on_stop(signum, frame) -> None:
    """SIGTERM/SIGINT, after W&B's own handlers passed it to the runs: the first starts the shutdown."""
    first = interrupts.requested() is None
    interrupts.note(signum)
    if _state["late"] and signum == _state["pending"]:
        _state["pending"] = None  # HOLD_S passed: the stop goes ahead without the answer
    elif not first:
        return  # a copy of the same stop (the entrypoint's, the batch script's)
    elif _state["holding"]:
        _state["pending"] = signum  # raised once the hand-out is on record and its run started

        def late() -> None:
            _state["late"] = True
            os.kill(os.getpid(), signum)

        timer = threading.Timer(HOLD_S, late)
        timer.daemon = True
        timer.start()
        return
    raise _shutdown(signum)


@contextlib.contextmanager
def _holding() -> Iterator[None]:
    """A stop waits until the block ends: from the server's answer to the run's process started."""
    _state["holding"] += 1
    try:
        yield
    finally:
        _state["holding"] -= 1
    if not _state["holding"] and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        for h in _open.values():  # a run started after the stop came never got it
            if h.process is not None and h.process.poll() is None:
                h.process.send_signal(signum)
        raise _shutdown(signum)


def _record(command: dict[str, Any]) -> None:
    sweep_id, run_id = settings.get("WANDB_SWEEP_ID", os.environ), command.get("run_id")
    if not (sweep_id and run_id and settings.get("SWEEP_DEDUPE", os.environ)) or run_id in _open:
        return
    params = dedupe.handed_params(command.get("args") or {})
    try:
        h = handouts.record(dedupe.claims_dir(os.environ), sweep_id, run_id, params)
    except OSError as exc:  # the run's own claim says the same in one line and fails
        print(f"[sweep] could not record run {run_id} as handed out ({exc})", file=sys.stderr, flush=True)
        return
    if h is not None:
        _open[run_id] = h


def settle(wait_s: float = 0.0) -> None:
    """Settle every hand-out whose run's process has ended. wait_s > 0: the agent ends; wait that long for
    runs still ending, and settle those never started too (a stop came first). A process still alive
    after that stays held: this process's end frees its hand-out for the next agent to settle."""
    deadline = time.monotonic() + wait_s
    for run_id, h in list(_open.items()):
        if h.process is None and not wait_s:
            continue  # being started
        if h.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            if h.process.poll() is None:
                continue
        del _open[run_id]
        handouts.settle(h, stopped=interrupts.requested() is not None)


def hook(agent_cls) -> None:
    """Record each hand-out of W&B's agent (`wandb.wandb_agent.Agent`) before its run's process starts."""
    heartbeat, command_run = agent_cls._heartbeat_commands, agent_cls._command_run

    def _heartbeat_commands(self, agent_id, run_status):
        settle()  # runs ended since the last heartbeat
        with _holding():
            commands = heartbeat(self, agent_id, run_status)
            for command in commands:
                if command.get("type") in ("run", "resume"):
                    _record(command)
        return commands

    def _command_run(self, command):
        with _holding():
            result = command_run(self, command)
            h = _open.get(command.get("run_id"))
            process = self._run_processes.get(command.get("run_id"))
            if h is not None and process is not None:
                h.process = process._popen
        return result

    agent_cls._heartbeat_commands, agent_cls._command_run = _heartbeat_commands, _command_run


def main(argv: list[str]) -> int:
    interrupts.quiet_wandb_lost()
    from wandb.cli.cli import cli
    from wandb.wandb_agent import Agent, ShutdownSignal

    hook(Agent)
    for sig in interrupts.SIGNALS:  # W&B's handlers, set per run, pass each signal on to this one
        signal.signal(sig, _on_stop)
    sys.argv = ["wandb", *argv]
    try:
        return cli()  # click ends with SystemExit(W&B's exit code)
    except ShutdownSignal as stop:  # before W&B's agent loop began
        return 128 + stop.signum
    finally:
        for sig in interrupts.SIGNALS:
            signal.signal(sig, lambda signum, frame: interrupts.note(signum))
        settle(wait_s=SETTLE_S)  # W&B has waited for its runs already, unless its loop ended early


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
