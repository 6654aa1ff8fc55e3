"""Where a run's wall time goes: marks at the ends of train()'s phases, kept only while a recorder is on.

    from app import phases
    phases.record()          # bench/trials.py: start keeping marks (off by default: a mark is then a no-op)
    phases.mark("data")      # train(): the phase named here just ended
    phases.take()            # [("data", perf_counter), ...] since record(); clears them

Times are `time.perf_counter()`, on Linux the system-wide monotonic clock, so a parent process can
line a child's marks up with the moment it started it.
"""

from __future__ import annotations

import time

_marks: list[tuple[str, float]] | None = None


def record() -> None:
    global _marks
    _marks = []


def mark(name: str) -> None:
    if _marks is not None:
        _marks.append((name, time.perf_counter()))


def take() -> list[tuple[str, float]]:
    global _marks
    taken, _marks = (_marks or []), ([] if _marks is not None else None)
    return taken
