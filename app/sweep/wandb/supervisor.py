"""The warm agent's supervisor: keeps one warm process (app.sweep.wandb.warm_agent) serving the sweep.

A process that can no longer be trusted is replaced, as `wandb agent` replaces a run's process: the
warm process is a child of `supervise()` (the entrypoint), and when it dies (a segfault, the kernel's
OOM killer) or ends itself after a CUDA error other than out-of-memory (exit UNTRUSTED), the run it
was training is lost as a crashed run is under `wandb agent` (W&B marks it crashed once its heartbeat
stops) and a fresh process takes the sweep's next run. Failures in a row count across the processes.

    code = supervisor.supervise(sweep, environ, count)     # the entrypoint, for AGENT_PROCESS=warm
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Mapping

from app import interrupts
from app.sweep.wandb.warm_agent import MAX_ERRORS_IN_A_ROW, UNTRUSTED, say


class Supervisor:
    """Keeps one warm agent process serving the sweep, replacing it when it crashes (see the module doc).

    The child reports each run's start and exit code on a pipe, so that AGENT_COUNT and the failures in
    a row carry over to the next process, and the line about a crash names the run it took with it."""

    def __init__(self, sweep: str, environ: Mapping[str, str], count: int | None):
        self.sweep, self.environ, self.count = sweep, dict(environ), count
        self.done = self.failures_in_a_row = 0

    def command(self, report_fd: int) -> list[str]:
        left = None if self.count is None else self.count - self.done
        return [sys.executable, "-m", "app.sweep.wandb.warm_agent", "--sweep", self.sweep, "--report-fd", str(report_fd),
                "--failed-in-a-row", str(self.failures_in_a_row), *(["--count", str(left)] if left is not None else [])]

    def start_one(self) -> tuple[int, int | None, str | None]:
        """One warm process until it ends: its return code, the stop signal we passed on, the run it was in."""
        read_fd, write_fd = os.pipe()
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(os.fdopen(read_fd, encoding="utf-8")), daemon=True)
        reader.start()
        try:
            code, stopped = interrupts.run_forwarding(self.command(write_fd), self.environ, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        reader.join(timeout=10)  # EOF once the child (the only other holder) is gone
        running = None
        for line in lines:
            kind, _, value = line.strip().partition(" ")
            if kind == "start":
                running = value
            elif kind == "end":
                running = None
                self.done += 1
                self.failures_in_a_row = 0 if value == "0" else self.failures_in_a_row + 1
        return code, stopped, running

    def run(self) -> int:
        interrupts.clear()  # a stop noted before this agent began is not one for it
        while True:
            code, stopped, running = self.start_one()
            if stopped:
                return 128 + stopped  # the child checkpointed its run and said so
            if code >= 0 and code != UNTRUSTED:
                return code  # the sweep is done, AGENT_COUNT reached, or the child's own reason (said)
            why = f"was killed by {signal.Signals(-code).name}" if code < 0 else "could no longer be trusted"
            if running:
                self.done += 1
                self.failures_in_a_row += 1
                why += f" during run {running} (lost as a crashed run: W&B marks it crashed)"
            elif code < 0:
                self.failures_in_a_row += 1  # died between runs: a process that cannot start is a failure too
            if self.failures_in_a_row >= MAX_ERRORS_IN_A_ROW:
                say(f"the warm process {why}; {self.failures_in_a_row} failures in a row: stopping this agent")
                return 1
            if self.count is not None and self.done >= self.count:
                say(f"the warm process {why}; ran {self.done} run(s) (AGENT_COUNT): agent exits")
                return 1 if running else 0
            if interrupts.requested():  # a stop that came after the process ended: no fresh one
                say(f"the warm process {why}; stopped meanwhile: no fresh one")
                return 128 + interrupts.requested()
            say(f"the warm process {why}; starting a fresh one for the sweep's next run")


def supervise(sweep: str, environ: Mapping[str, str], count: int | None) -> int:
    return Supervisor(sweep, environ, count).run()
