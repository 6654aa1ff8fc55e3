"""Where a run trains and what it trains on: its device, seeds and data (train() and bench/ set up the same
way), and what a run leaves on its GPU afterwards."""

from __future__ import annotations

import gc
from typing import NamedTuple

import torch

from app import data, ranks
from app.config import Config
from app.errors import UserError


def pick_device(config: Config) -> torch.device:
    """The training device, with an index on CUDA (`torch.cuda.set_device` refuses a bare "cuda")."""
    if config.device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={config.device!r} but no CUDA device is visible; use device=auto or device=cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"device={config.device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        device = torch.device("cuda", device.index or 0)
    return device


class Setup(NamedTuple):
    device: torch.device
    ds: data.Dataset
    gen: torch.Generator  # the training order's generator (checkpointed)
    fmt: dict  # how Batches normalise and lay out images
    train: data.Batches
    val: data.Batches
    test: data.Batches


def setup(config: Config, team: ranks.Team = ranks.Team()) -> Setup:
    """Device, seeds and data exactly as train() prepares them (bench/ measures the same setup). With a
    team of ranks: this rank's GPU, its share of each training batch, its shard of val and test."""
    device = team.device(pick_device(config))
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        if config.gpu_memory_fraction > 0:
            torch.cuda.set_per_process_memory_fraction(config.gpu_memory_fraction, device)
    ds = data.load(config.dataset, config.data_dir, config.val_size, config.train_stride, device)
    gen = torch.Generator(device=device)
    gen.manual_seed(config.seed)
    fmt = dict(mean=ds.mean, std=ds.std, channels_last=config.channels_last)
    eval_size = max(config.batch_size, 1000)  # evaluation has no gradients: bigger batches are free speed
    val, test = (data.shard(s, team.rank, team.size) for s in (ds.val, ds.test))
    return Setup(device, ds, gen, fmt, data.Batches(ds.train, config.batch_size, shuffle=True, generator=gen, **fmt),
                 data.Batches(val, eval_size, shuffle=False, **fmt), data.Batches(test, eval_size, shuffle=False, **fmt))


def release_device_memory() -> str | None:
    """After a run in a process that runs many (the sweep agents): what the run left on the GPU goes now,
    not when the next run needs the memory, and what stays is said, so that growth across runs shows in
    the log (bench/trials.py reads these lines). None on the CPU."""
    if not torch.cuda.is_initialized():
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return (f"GPU memory after the run: {torch.cuda.memory_allocated()} bytes allocated, "
            f"{torch.cuda.memory_reserved()} reserved")
