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
preempted on a GPU host may finish on another. Not the device type, though: the data order of the
rest of the run (mid-epoch, which examples of that epoch are still to come) is the checkpoint's
generator stream, and a CPU generator (mt19937) cannot continue a CUDA one's (Philox: seed and offset)
or the other way round; there is no exact translation, and a reseeded order would train some examples
twice and skip others. So a checkpoint written on CUDA resumes on CUDA (any GPU), one written on the
CPU on the CPU; the other is refused in one line. A finished run (its model.onnx exported) is never
run again: a rerun would train nothing and redo test and export as a second W&B run with the same
id. Start a new run instead (leave WANDB_RUN_ID unset), or set resume=false to train it again from
scratch under that id on purpose.
"""

from __future__ import annotations

import contextlib
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
    try:
        with open(tmp, "wb") as f:  # opened here: a refused open is an OSError, not torch's RuntimeError
            torch.save(state, f)
        os.replace(tmp, path)
    except OSError as exc:  # the volume filled up or turned read-only under a running job
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {path} ({exc.strerror or exc}); the previous checkpoint is "
                        "kept: free space or make the folder writable, then rerun this run id to resume") from None


def load(path: Path, device: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's state. Loaded with weights_only: a checkpoint is data and never runs code."""
    import torch

    # a FIFO (or a device, a socket) would block the read forever; a folder is refused as damaged below
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise UserError(f"checkpoint {path} is not a regular file; remove it to train this run again, or set "
                        "resume=false")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises several types
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint ({type(exc).__name__}); delete it "
                        "to train this run again, or set resume=false") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"checkpoint {path} is not a training checkpoint; delete it or set resume=false")
    return state


COUNTERS = ("epoch", "examples_seen", "epoch_examples")  # non-negative ints, as train() writes them
# the last finished epoch's val metrics (floats, NaN before the first epoch or without a val split): a run
# resumed after its last epoch reports them. Checkpoints written before they were kept lack them
VAL_METRICS = ("val_loss", "val_accuracy")


def _refuse(path: Path, what: str) -> UserError:
    return ResumeRefused(f"checkpoint {path} {what}: not one this program wrote for these settings; delete it "
                         "to train this run again, or set resume=false")


def _check_counters(state: dict[str, Any], path: Path) -> None:
    for key in COUNTERS:
        value = state.get(key)
        if type(value) is not int or value < 0:
            raise _refuse(path, f"has {key}={_brief(value)} (a count >= 0 expected)")
    for key in VAL_METRICS:
        if key in state and type(state[key]) is not float:
            raise _refuse(path, f"has {key}={_brief(state[key])} (a float expected)")


def _brief(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return repr(value)[:40] if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__


def check_state(state: Any, config: Config, path: Path) -> None:
    """The checkpoint's structure and every tensor's shape against what `config` builds; one line naming
    the file otherwise. A checkpoint may come from elsewhere (copied, another version, another run's
    folder): whatever load_state_dict, the optimizer or the data order would trip on is refused here, and so
    are NaN or infinite weights or Adam moments (a diverged run's: every step from them is NaN)."""
    import torch

    from app.model import ConvNet

    if not isinstance(state, dict):
        raise _refuse(path, f"holds {_brief(state)}, not a dict of entries")
    for key in ("model", "optimizer", "config"):
        if not isinstance(state.get(key), dict):
            raise _refuse(path, f"has no {key} entry" if key not in state else f"has {key}={_brief(state[key])}")
    _check_counters(state, path)
    generator = state.get("generator")
    sizes = _generator_sizes()
    if (not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8 or generator.dim() != 1
            or generator.numel() not in sizes.values()):
        raise _refuse(path, "has no generator state" if generator is None else f"has generator={_brief(generator)}")

    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: list(v.shape) for k, v in ConvNet(config.kernels, config.classes).state_dict().items()}
    weights = state["model"]
    extra = sorted(map(str, weights.keys() - expected.keys()))
    if extra:
        raise _refuse(path, f"has weight {extra[0][:40]!r} that kernels={_shown(config.kernels)} does not build")
    for name, shape in expected.items():
        value = weights.get(name)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or list(value.shape) != shape:
            got = f"no {name}" if name not in weights else f"{name} as {_brief(value)}"
            raise _refuse(path, f"has {got} where kernels={_shown(config.kernels)}, classes={config.classes} need "
                                f"shape {shape}")
    bad = nonfinite({name: weights[name] for name in expected})
    if bad:
        raise _diverged(path, bad)
    _check_optimizer(state["optimizer"], list(expected.values()), path)
    written = next(kind for kind, size in sizes.items() if size == generator.numel())
    training = _device_type(config)
    if written != training:
        raise ResumeRefused(
            f"checkpoint {path} was written training on {DEVICE_NAMES[written]} but this run trains on "
            f"{DEVICE_NAMES[training]} (device={config.device}): its data order cannot continue on another device "
            f"type; resume it with device={written}, or set resume=false to train it again from scratch")


def nonfinite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, None when all are finite.
    One host-device sync for all of them (train() asks before each checkpoint it writes)."""
    import torch

    named = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return None
    return next(name for name, t in named if not bool(torch.isfinite(t).all()))


def _diverged(path: Path, name: str) -> UserError:
    return ResumeRefused(f"checkpoint {path} holds NaN or infinite values in {name} (a diverged run's weights): "
                         "training cannot continue from it; delete it to train this run again, or set resume=false")


DEVICE_NAMES = {"cpu": "the CPU", "cuda": "CUDA"}


def _generator_sizes() -> dict[str, int]:
    """The bytes of a data-order generator's state per device type: the CPU's mt19937 state; CUDA's
    Philox seed and offset (two 8-byte integers, CUDAGeneratorImpl::get_state)."""
    import torch

    return {"cpu": torch.Generator().get_state().numel(), "cuda": 16}


def _device_type(config: Config) -> str:
    """cpu or cuda: where `config` trains (device=auto: CUDA when one is visible, as train.pick_device)."""
    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(config.device).type


def _check_optimizer(optimizer: dict[str, Any], shapes: list[list[int]], path: Path) -> None:
    """Adam's state_dict: param_groups covering each parameter once, moments shaped like their parameter."""
    import torch

    groups = optimizer.get("param_groups")
    moments = optimizer.get("state")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise _refuse(path, "has an optimizer entry without Adam's param_groups")
    ids = [i for g in groups for i in g["params"]]
    if not all(type(i) is int for i in ids) or sorted(ids) != list(range(len(shapes))):
        raise _refuse(path, f"has an optimizer for {len(ids)} parameter(s) where the model has {len(shapes)}")
    if not isinstance(moments, dict) or not set(moments) <= set(ids):
        raise _refuse(path, "has an optimizer entry whose state names no parameter of the model")
    for i, entry in moments.items():
        if not isinstance(entry, dict):
            raise _refuse(path, f"has optimizer state {i} = {_brief(entry)}")
        for key in ("exp_avg", "exp_avg_sq"):
            value = entry.get(key)
            if not isinstance(value, torch.Tensor) or list(value.shape) != shapes[i]:
                raise _refuse(path, f"has optimizer {key} of parameter {i} as {_brief(value)}, shape {shapes[i]} expected")
            bad = nonfinite({f"optimizer {key} of parameter {i}": value})
            if bad:
                raise _diverged(path, bad)
        step = entry.get("step")
        if not (isinstance(step, torch.Tensor) and step.numel() == 1) and type(step) not in (int, float):
            raise _refuse(path, f"has optimizer step of parameter {i} as {_brief(step)}")


def epochs_done(path: Path, config: Config) -> tuple[int, dict[str, float]]:
    """The epochs a checkpoint holds and the val metrics of the last of them (empty when it predates
    them), after the same check a resume makes (it may be copied from elsewhere)."""
    state = load(path)
    check_state(state, config, path)
    return state["epoch"], last_val(state)


def last_val(state: dict[str, Any]) -> dict[str, float]:
    """The checked state's val metrics of its last epoch; empty for a checkpoint from before they were kept."""
    return {k: state[k] for k in VAL_METRICS if k in state}


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
    saved = state.get("config")
    # the settings first: "kernels 16,32 -> 8" says more than the weight shapes that follow from it
    changed = differences(saved, config) if isinstance(saved, dict) else []
    if changed:
        raise ResumeRefused(f"run {run_id} has a checkpoint made with other training settings ({'; '.join(changed)}); "
                            "rerun with the same settings, or use a new run id")
    check_state(state, config, path)
    done = state["epoch"]
    if config.epochs < done:
        raise ResumeRefused(f"epochs={config.epochs} but run {run_id} already trained {done} epoch(s); "
                            f"epochs may only grow on resume (>= {done})")
    return state
