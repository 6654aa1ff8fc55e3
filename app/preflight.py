"""Everything checked before a run starts: a setting that can't work is one error line, and no W&B
run is left to sync for it.

    ready = preflight.check(config, environ)       # W&B mode, writable folders, settings vs the data
    train(config, environ, ready=ready)            # train() calls check() itself when not given one

Settings vs the data: `classes` must exceed every label in the files, `train_stride` must not step
past the whole set, `val_size` must fit in the images held out (data.split_indices decides). Only the
label files are read (60 kB), from the dataset's raw folder (unpacked or fetched by `data.ensure`
first); of the image files, their headers and sizes (a damaged file is refused here, not after W&B
opened a run). app.data reads both, as it reads every IDX file. `device=cuda:N` is checked against the
devices this process sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from app import places, settings, tracking
from app.config import Config
from app.errors import UserError

LABEL_FILES = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")
IMAGE_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")


@dataclass(frozen=True)
class Ready:
    mode: str  # the W&B mode, resolved once
    runs_root: Path  # WANDB_DIR, checked writable
    output_root: Path  # OUTPUT_DIR, checked writable


def check_environment(config: Config, environ: Mapping[str, str]) -> Ready:
    """The run id, the W&B mode and the two folders a run writes, without touching the data (no torch import)."""
    run_id = settings.get("WANDB_RUN_ID", environ)  # it names the run's folder: checked before anything is written under it
    mode = tracking.resolve_mode(environ)
    root = settings.runs_root(environ)
    tracking.check_writable(root, "WANDB_DIR")
    output_root = Path(config.output_dir)
    tracking.check_writable(output_root, "OUTPUT_DIR")
    if run_id:  # a rerun's folder may be there already: a file, or read-only, where checkpoints go
        places.check_folder(output_root / run_id, f"the folder of run {run_id}")
    return Ready(mode, root, output_root)


def check_device(config: Config) -> None:
    """device=cuda[:N] against the devices this process sees (the training device itself is picked later)."""
    if not config.device.startswith("cuda"):
        return
    import torch

    index = int(config.device.partition(":")[2] or 0)
    # counted through NVML, which honours CUDA_VISIBLE_DEVICES without starting CUDA: an agent checks its
    # settings before it claims a GPU slot, and CUDA started now would never see the slot's device
    count = torch.cuda._device_count_nvml()
    if count < 0:  # no NVML, so no NVIDIA driver in practice: then CUDA cannot start either
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"device={config.device!r} but no CUDA device is visible; use device=auto or device=cpu")
    if index >= count:
        raise UserError(f"device={config.device!r} but only {count} CUDA device(s) are visible")


def check_data(config: Config) -> None:
    """The settings that only the dataset and the machine can refuse (see the module docstring)."""
    from app import data  # imports torch: only once the cheaper checks have passed

    check_device(config)
    folder = data.ensure(config.dataset, config.data_dir)
    labels = {name: data.read_labels(folder / name) for name in LABEL_FILES}
    for images, name in zip(IMAGE_FILES, LABEL_FILES):
        data.check_images(folder / images, len(labels[name]), folder / name)
    for name, values in labels.items():
        top = max(values, default=-1)
        if top >= config.classes:
            raise UserError(f"classes={config.classes} but {folder / name} has label {top}: "
                            f"classes must be at least {top + 1} for {config.dataset}")
    n = len(labels[LABEL_FILES[0]])
    if config.train_stride > n:
        raise UserError(f"train_stride={config.train_stride} is more than the {n} training images of {config.dataset}: "
                        f"must be at most {n}")
    data.split_indices(n, config.val_size, config.train_stride, config.dataset)  # val_size vs what is left


def check(config: Config, environ: Mapping[str, str]) -> Ready:
    ready = check_environment(config, environ)
    check_data(config)
    return ready
