"""A diverged run: the first loss, val_loss or weight that is no longer finite ends the run there, as a result.

A learning rate set (or drawn by a random sweep) far too high sends the loss to inf or NaN within a few
steps. Training on cannot bring it back, and a model of NaN weights can be neither tested nor exported. So
train() looks at what it already brings to the host (the loss at each log point, val_loss after each
epoch, test_loss) and at the weights before it writes a checkpoint, raises `Diverged` at the first
non-finite one, and ends the run there: summary `diverged`=True and where, no checkpoint of the
non-finite weights (the one from before stays, unfinished: no model.onnx), no test, no ONNX, no model
artifact. The W&B run finishes with exit code 0: a finished trial whose values diverge, not a failed
run, so an agent goes on to the next.
"""

from __future__ import annotations

import math
from typing import Any


class Diverged(Exception):
    """Where the run diverged: `what` (e.g. "loss nan"), the epoch (counted from 0, as the run's history
    logs it) and the step (examples seen, the run's step axis)."""

    def __init__(self, what: str, epoch: int, step: int):
        super().__init__(f"{what} at step {step} (epoch {epoch + 1})")
        self.epoch, self.step = epoch, step

    def summary(self) -> dict[str, Any]:
        """What the run's summary and train()'s result say about it."""
        return {"diverged": True, "diverged_at": str(self), "diverged_step": self.step, "diverged_epoch": self.epoch}


def check(name: str, value: float, epoch: int, step: int) -> None:
    """Raise Diverged when `value` (a reading already on the host) is NaN or infinite."""
    if not math.isfinite(value):
        raise Diverged(f"{name} {value}", epoch, step)
