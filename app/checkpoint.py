"""Per-run checkpoints (<output_dir>/<run id>/checkpoint.pt): written atomically, read back, and the rule
for when a run id may be resumed.

Resuming continues one run: the same W&B run id, the weights, the optimizer state and the data order
of the checkpoint. So a rerun of an existing run id is refused, in one line naming what differs,
unless every setting that shapes what the run learns matches the checkpoint's config:

- kernels, classes, architecture: the weights' shapes (a mismatch cannot even load);
- learning_rate: Adam's state carries it; the new value would be recorded but the old one used;
- batch_size, dataset, train_stride, val_size: which examples make an epoch, what val_accuracy measures;
- seed: the data order comes from the checkpoint's generator; a new seed would be recorded, not used;
- amp: bf16 against float32 changes the numbers of every later step.

Free to change on resume: epochs may grow (a preempted run can be given more epochs; fewer than it
already trained is refused), and the settings that only decide where and how fast it runs (device,
channels_last, compile, cuda_graph, gpu_memory_fraction, data_dir, output_dir, logging): a run
preempted on a GPU host may finish on another. A finished run (its model.onnx exported) is never
run again: a rerun would train nothing and redo test and export as a second W&B run with the same
id. Start a new run instead (leave WANDB_RUN_ID unset), or set resume=false to train it again from
scratch under that id on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from app.config import Config
from app.errors import UserError

FILE = "checkpoint.pt"
EXPORT = "model.onnx"  # written last: its presence means the run finished
SHAPING = ("kernels", "classes", "architecture", "learning_rate", "batch_size", "dataset", "train_stride",
           "val_size", "seed", "amp")


class ResumeRefused(UserError):
    pass


def save(path: Path, **state: Any) -> None:
    """Write-then-rename: a stop or crash mid-write leaves the previous checkpoint intact."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, device: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's state. Loaded with weights_only: a checkpoint is data and never runs code."""
    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises several types
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint ({type(exc).__name__}); delete it "
                        "to train this run again, or set resume=false") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"checkpoint {path} is not a training checkpoint; delete it or set resume=false")
    return state


def epochs_done(path: Path) -> int:
    return int(load(path).get("epoch", 0))


def _shown(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def differences(saved: dict[str, Any], config: Config) -> list[str]:
    """`key saved -> now` for each shaping setting the new config changes (lists compare as lists)."""
    now = config.to_dict()
    out = []
    for key in SHAPING:
        if key not in saved:
            continue  # a checkpoint from before this key existed: nothing to compare
        old, new = saved[key], now[key]
        if (list(old) if isinstance(old, (list, tuple)) else old) != new:
            out.append(f"{key} {_shown(old)} -> {_shown(new)}")
    return out


def check_resume(config: Config, run_dir: Path, run_id: str, device: Any = "cpu") -> dict[str, Any] | None:
    """The checkpoint to resume from, None when there is nothing to resume; refuses (one line) a finished
    run and a checkpoint whose training settings differ from `config`."""
    if not config.resume:
        return None
    if (run_dir / EXPORT).exists():
        raise ResumeRefused(f"run {run_id} already finished ({run_dir / EXPORT} exists); start a new run "
                            "(unset WANDB_RUN_ID), or set resume=false to train it again from scratch")
    path = run_dir / FILE
    if not path.exists():
        return None
    state = load(path, device)
    saved = state.get("config") or {}
    changed = differences(saved, config)
    if changed:
        raise ResumeRefused(f"run {run_id} has a checkpoint made with other training settings ({'; '.join(changed)}); "
                            "rerun with the same settings, or use a new run id")
    done = int(state.get("epoch", 0))
    if config.epochs < done:
        raise ResumeRefused(f"epochs={config.epochs} but run {run_id} already trained {done} epoch(s); "
                            f"epochs may only grow on resume (>= {done})")
    return state
