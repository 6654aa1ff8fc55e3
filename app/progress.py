"""Progress for people: a tqdm bar on a terminal, plain periodic lines in container logs."""

from __future__ import annotations

import sys
import time


class Progress:
    """One epoch's progress; `update` is called at log points only (values already on the host)."""

    def __init__(self, epoch: int, epochs: int, total_examples: int, *, every_s: float = 10.0, stream=None):
        self.epoch, self.epochs, self.total, self.every_s = epoch, epochs, total_examples, every_s
        self.stream = stream or sys.stdout
        self.start = self.last_print = time.perf_counter()
        self.done = 0
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_examples, desc=f"epoch {epoch}/{epochs}", unit="ex", unit_scale=True,
                            leave=False, file=self.stream, dynamic_ncols=True)

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, examples_done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(examples_done - self.done)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        self.done = examples_done
        now = time.perf_counter()
        if self.bar is None and now - self.last_print >= self.every_s:
            self.last_print = now
            self.line(f"examples {examples_done}/{self.total} loss {loss:.4f} {self.rate():.0f} ex/s")

    def line(self, text: str) -> None:
        msg = f"epoch {self.epoch}/{self.epochs} {text}"
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self, summary: str, examples_done: int) -> None:
        self.done = examples_done  # an epoch shorter than one log interval never called update()
        if self.bar is not None:
            self.bar.close()
        self.line(f"{summary} {self.rate():.0f} ex/s")
