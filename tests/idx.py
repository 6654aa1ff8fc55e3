"""Write small MNIST-format (IDX) files, so data tests don't need the real 47 MB sets.

IDX: a big-endian magic (0x0000, type 0x08 = unsigned byte, number of dimensions), one big-endian
uint32 per dimension, then the bytes. Images are [N, rows, cols], labels [N].
"""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np

from app.data import DATASETS, FILES, idx_shape


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    path = Path(f"{path}.gz") if gz else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = idx_bytes(array)
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def synthetic(n: int, classes: int = 10, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class c is a bright 7x7 square at one of 10 spots, over dim noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, col = 2 + 9 * (int(c) // 4), 2 + 6 * (int(c) % 4)
        images[i, r:r + 7, col:col + 7] = 255
    return images, labels


def write_dataset(data_dir: Path, dataset: str = "mnist", n_train: int = 600, n_test: int = 200,
                  gz: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """The four files of `dataset` in torchvision's layout under `data_dir`; returns what was written."""
    raw = Path(data_dir) / DATASETS[dataset][0] / "raw"
    train_x, train_y = synthetic(n_train, seed=seed)
    test_x, test_y = synthetic(n_test, seed=seed + 1)
    arrays = dict(zip(FILES, (train_x, train_y, test_x, test_y)))
    for name, array in arrays.items():
        write_idx(raw / name, array, gz=gz)
    return arrays


def first_items(source: Path, target: Path, count: int) -> Path:
    """The IDX file `source` (gzipped or not) cut to its first `count` items, written to `target` the same way."""
    gz = Path(source).suffix == ".gz"
    blob = Path(source).read_bytes()
    blob = gzip.decompress(blob) if gz else blob
    shape = idx_shape(blob)
    head = 4 + 4 * len(shape)
    item = int(np.prod(shape[1:], dtype=np.int64))
    cut = blob[:4] + struct.pack(">I", count) + blob[8:head] + blob[head:head + count * item]
    Path(target).write_bytes(gzip.compress(cut, compresslevel=1) if gz else cut)
    return Path(target)


def copy_with_short_test_set(files: list[Path], raw: Path, count: int) -> None:
    """Fashion-MNIST's `files` into the folder `raw`, the test set (t10k-*) cut to its first `count` items."""
    for f in files:
        if f.name.startswith("t10k"):
            first_items(f, raw / f.name, count)
        else:
            shutil.copyfile(f, raw / f.name)
