"""Everything checked before a run starts: a setting that can't work is one error line, and no W&B
run is left to sync for it.

    ready = preflight.check(config, environ)       # W&B mode, writable folders, settings vs the data
    train(config, environ, ready=ready)            # train() calls check() itself when not given one

Settings vs the data: `classes` must exceed every label in the files, `train_stride` must not step
past the whole set, `val_size` must fit in the images held out (data.split_indices decides). Only the label files are read (60 kB), from
the dataset's raw folder (unpacked or fetched by `data.ensure` first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from app import env, tracking
from app.config import Config
from app.errors import UserError

LABEL_FILES = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")
LABELS_MAGIC = 2049  # IDX: unsigned bytes, one dimension
MAX_LABEL_BYTES = 1 << 24  # MNIST's are 60 kB; a bigger file is not a label file


@dataclass(frozen=True)
class Ready:
    mode: str  # the W&B mode, resolved once
    runs_root: Path  # WANDB_DIR, checked writable
    output_root: Path  # OUTPUT_DIR, checked writable


def check_environment(config: Config, environ: Mapping[str, str]) -> Ready:
    """The run id, the W&B mode and the two folders a run writes, without touching the data (no torch import)."""
    env.run_id(environ)  # it names the run's folder: checked before anything is written under it
    mode = tracking.resolve_mode(environ)
    root = env.runs_root(environ)
    tracking.check_writable(root, "WANDB_DIR")
    output_root = Path(config.output_dir)
    tracking.check_writable(output_root, "OUTPUT_DIR")
    return Ready(mode, root, output_root)


def read_labels(path: Path) -> bytes:
    """The labels of an IDX label file, one byte each."""
    try:
        if os.path.getsize(path) > MAX_LABEL_BYTES:
            raise UserError(f"{path} is over {MAX_LABEL_BYTES >> 20} MiB: not an IDX label file")
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != LABELS_MAGIC or int.from_bytes(raw[4:8], "big") != len(raw) - 8:
        raise UserError(f"{path} is not a valid IDX label file: replace it with a good copy")
    return raw[8:]


def check_data(config: Config) -> None:
    """The settings that only the dataset can refuse (see the module docstring)."""
    from app import data  # imports torch: only once the cheaper checks have passed

    folder = data.ensure(config.dataset, config.data_dir)
    labels = {name: read_labels(folder / name) for name in LABEL_FILES}
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
