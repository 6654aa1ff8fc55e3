"""How busy the machine was with other processes while a benchmark measured (Linux /proc; stdlib only,
so bench/container.py can use it without torch)."""

from __future__ import annotations

import os
import time
from pathlib import Path

NOISY = 0.10  # other processes using more than this share of the CPUs during a measurement make it noisy


class CpuShare:
    """How much of the machine's CPU time went to processes outside this benchmark while it measured.

    Other processes on a small machine slow training far more than their own CPU use suggests: with
    one torch thread per core, a thread that loses its core stalls the others at the next barrier.
    This is the number that says whether a measurement was taken alone. Linux only (/proc).
    """

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self):
        self._start = self._sample()

    @classmethod
    def _sample(cls) -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        busy = (user + nice + system + irq + softirq + steal) / cls.HZ  # steal: other VMs on the same host
        t = os.times()  # this process, and its children once reaped (DataLoader workers)
        return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system + cls._live_children()

    @classmethod
    def _live_children(cls) -> float:
        """CPU seconds of descendants still running (W&B's service process lives as long as we do)."""
        parents: dict[int, int] = {}
        times: dict[int, float] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            rest = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
            pid = int(stat.parent.name)
            parents[pid], times[pid] = int(rest[1]), (int(rest[11]) + int(rest[12])) / cls.HZ
        ours, total, frontier = {os.getpid()}, 0.0, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in ours:
                    ours.add(pid)
                    frontier.append(pid)
                    total += times[pid]
        return total

    def others(self) -> float | None:
        """Share of all CPUs (0..1) used by other processes since this object was made."""
        return self.measure()[0]

    def measure(self) -> tuple[float | None, float | None]:
        """(share of all CPUs other processes used, CPU seconds this process and its children used) so far."""
        end = self._sample()
        if self._start is None or end is None:
            return None, None
        wall, busy, ours = (b - a for a, b in zip(self._start, end))
        return (max(0.0, (busy - ours) / (wall * (os.cpu_count() or 1))) if wall > 0 else None), ours


def others_over(seconds: float) -> float | None:
    """Share of all CPUs other processes use during the next `seconds` (this process waits meanwhile)."""
    share = CpuShare()
    time.sleep(seconds)
    return share.others()


def wait_until_idle(max_wait_s: float, below: float = NOISY, window_s: float = 5.0) -> float | None:
    """Wait (up to `max_wait_s`) for a `window_s` window in which other processes used < `below` of the CPUs."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        others = others_over(window_s)
        if others is None or others < below or time.perf_counter() >= deadline:
            return others
