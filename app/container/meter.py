"""Progress of a long copy for people: a bar with bytes and rate on a terminal, and otherwise (a log, a
pipe, CI) one line when each phase starts and one when it ends, with its size, time and rate.

    with Meter("docker save mnist-sweeps:latest", total=6.1e9) as m:
        m.add(len(block))            # or m.at(bytes_done) where only a file's growing size is known
"""

from __future__ import annotations

import sys
import time


def size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


class Meter:
    def __init__(self, phase: str, total: float | None = None, *, prefix: str = "bundle", stream=None):
        self.phase, self.total, self.prefix = phase, total, prefix
        self.stream = stream or sys.stdout
        self.done = 0
        self.bar = None

    def __enter__(self) -> "Meter":
        self.start = time.monotonic()
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=f"{self.prefix}: {self.phase}", unit="B", unit_scale=True,
                            unit_divisor=1000, leave=False, file=self.stream, dynamic_ncols=True)
        else:
            about = f" ({size(self.total)})" if self.total else ""
            print(f"{self.prefix}: {self.phase}{about} ...", file=self.stream, flush=True)
        return self

    def add(self, n: int) -> None:
        self.at(self.done + n)

    def at(self, done: int) -> None:
        if self.bar is not None and done > self.done:
            self.bar.update(done - self.done)
        self.done = max(done, self.done)

    def __exit__(self, kind, exc, tb) -> bool:
        if self.bar is not None:
            self.bar.close()
        if kind is None:
            seconds = time.monotonic() - self.start
            rate = f", {size(self.done / seconds)}/s" if seconds > 0.05 and self.done else ""
            print(f"{self.prefix}: {self.phase}: {size(self.done)} in {seconds:.1f} s{rate}", file=self.stream, flush=True)
        return False


class Reader:
    """A binary file read through a Meter, hashed on the way when `digest` is given: one pass over the data."""

    def __init__(self, raw, meter: Meter, digest=None):
        self.raw, self.meter, self.digest = raw, meter, digest

    def read(self, n: int = -1) -> bytes:
        block = self.raw.read(n)
        if self.digest is not None:
            self.digest.update(block)
        self.meter.add(len(block))
        return block
