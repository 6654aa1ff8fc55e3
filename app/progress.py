"""Progress for people (a tqdm bar on a terminal, plain periodic lines in container logs), and the loss
readings they show, brought to the host without stalling the device."""

from __future__ import annotations

import sys
import time

import torch


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


class _Ready:
    """The CPU's stand-in for a CUDA event: a copy on the CPU is done when `copy_` returns."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class LossReadout:
    """Brings each log interval's loss sum to the host without making the host wait for the device.

    `push` queues a non-blocking copy of the sum into pinned memory and records a CUDA event after it;
    `ready` hands back, oldest first, the readings whose copy has landed. The host never blocks on work
    queued after the previous log point: a reading older than the newest is waited for (it is one
    interval old, so in practice long done), which bounds every value to one interval late. Values and
    their `meta` (step, epoch, ...) are exactly what a blocking `.item()` at the push would have given.
    On the CPU the same code runs with an always-ready event, so each value comes back at its own push.
    """

    def __init__(self, device: torch.device, slots: int = 3):
        self.cuda = device.type == "cuda"
        # a ring of host buffers: at most two readings are pending (the newest and its predecessor)
        self.buffers = [torch.zeros((), pin_memory=self.cuda) for _ in range(slots)]
        self.next = 0
        self.pending: list[tuple[object, object, object]] = []  # (event, host buffer, meta)
        self.landed: list[tuple[float, object]] = []  # read to free a buffer, not yet handed back

    def push(self, value, meta) -> None:
        """Queue a reading of the 0-d tensor `value`; the caller may change `value` right after (stream order)."""
        if len(self.pending) >= len(self.buffers) - 1:
            self.landed = self.ready()  # free a buffer: never overwrite an unread one (kept for the next ready)
        buffer = self.buffers[self.next]
        self.next = (self.next + 1) % len(self.buffers)
        buffer.copy_(value.detach(), non_blocking=self.cuda)
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        else:
            event = _Ready()
        self.pending.append((event, buffer, meta))

    def ready(self) -> list[tuple[float, object]]:
        """(value, meta) of every reading that has landed, oldest first; older ones than the newest are waited for."""
        out, self.landed = self.landed, []
        while self.pending:
            event, buffer, meta = self.pending[0]
            if not event.query():
                if len(self.pending) == 1:
                    break
                event.synchronize()
            out.append((buffer.item(), meta))
            self.pending.pop(0)
        return out

    def drain(self) -> list[tuple[float, object]]:
        """Every pending reading, waiting for all of them (at an epoch's end, before a checkpoint)."""
        for event, _, _ in self.pending:
            event.synchronize()
        return self.ready()
