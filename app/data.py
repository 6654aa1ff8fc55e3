"""MNIST / Fashion-MNIST as device-resident uint8 tensors.

torchvision stays the source of the files (its layout under DATA_DIR, its download code and mirrors;
the IDX files themselves are read here), but training never goes through a DataLoader: the whole set (47 MB as uint8) is moved to the training
device once, shuffled there with `randperm` and normalised there batch by batch. No worker processes,
no per-image Python work.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import shutil
import socket
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from app.errors import UserError

# torchvision class, folder under DATA_DIR, and the pixel mean/std of the training images
DATASETS = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashion_mnist": ("FashionMNIST", 0.2860, 0.3530),
}
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# copies that a system package installs (Debian's dataset-fashion-mnist): used before any download
SYSTEM_COPIES = {"fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),)}
DOWNLOAD_TIMEOUT_S = 20  # per connection: a host without internet fails fast instead of hanging


class DataError(UserError):
    pass


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 1, 28, 28], on the training device
    labels: torch.Tensor  # int64 [N], on the training device

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    mean: float
    std: float


def raw_folder(data_dir: str | Path, dataset: str) -> Path:
    return Path(data_dir) / DATASETS[dataset][0] / "raw"


def _decompress(folder: Path) -> None:
    """Unpack `<file>.gz` where only the archive is there (as Debian's dataset packages ship them)."""
    for name in FILES:
        target, archive = folder / name, folder / f"{name}.gz"
        if not target.exists() and archive.exists():
            # agents sharing DATA_DIR unpack at once; pids repeat across containers, so a random name
            tmp = folder / f".{name}.{uuid.uuid4().hex}.part"
            try:
                with gzip.open(archive, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                tmp.unlink(missing_ok=True)
                raise DataError(f"{archive} is not a valid gzip archive ({exc}): replace it with a good copy") from None
            except BaseException:  # a stop (SIGTERM/SIGINT) or a full disk mid-way: no half-written file left
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, target)  # a crash mid-way never leaves a truncated file under the real name


def _copy_system_archives(dataset: str, folder: Path) -> None:
    missing = [f for f in FILES if not (folder / f).exists() and not (folder / f"{f}.gz").exists()]
    for source in SYSTEM_COPIES.get(dataset, ()):
        if missing and all((source / f"{f}.gz").exists() for f in missing):
            folder.mkdir(parents=True, exist_ok=True)
            for f in missing:
                tmp = folder / f".{f}.gz.{uuid.uuid4().hex}.part"
                try:
                    shutil.copyfile(source / f"{f}.gz", tmp)
                except BaseException:  # a stop or a full disk mid-copy: no half-written file left
                    tmp.unlink(missing_ok=True)
                    raise
                os.replace(tmp, folder / f"{f}.gz")
            return


def ensure(dataset: str, data_dir: str | Path) -> Path:
    """Make sure the four IDX files are in torchvision's raw folder: unpack, else download, else one clear error."""
    folder = raw_folder(data_dir, dataset)
    try:
        _copy_system_archives(dataset, folder)
        _decompress(folder)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot prepare {dataset} in {folder} ({getattr(exc, 'strerror', None) or exc}); DATA_DIR must be writable") from None
    if all((folder / f).exists() for f in FILES):
        return folder
    from torchvision import datasets

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints every mirror it tries
            getattr(datasets, DATASETS[dataset][0])(root=str(data_dir), train=True, download=True)
    except PermissionError:
        raise DataError(f"DATA_DIR={str(data_dir)!r} is not writable, so {dataset} cannot be downloaded into {folder}") from None
    except Exception as exc:  # URLError, timeouts, HTTP errors, checksum mismatches
        cause = exc.__cause__ or exc.__context__ or exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]  # the cause, not the preamble
        # the way to train with no internet at all, said where a user without one first looks
        offline = ("or, with no internet, apt-get install dataset-fashion-mnist and set DATASET=fashion_mnist"
                   if dataset == "mnist" else "or apt-get install dataset-fashion-mnist (Debian's copy, used at once)")
        raise DataError(
            f"{dataset} is not in {folder} and could not be downloaded ({reason[:100]}): "
            f"put {', '.join(f + '.gz' for f in FILES)} there (gzipped or not), {offline}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return folder


# IDX, MNIST's file format: a big-endian magic (0x0000, 0x08 = unsigned bytes, the number of dimensions),
# one big-endian uint32 per dimension, then the bytes. Its headers are parsed here only (idx_shape).
IDX_MAGIC = b"\0\0\x08"
MAX_IDX_BYTES = 64 * 1024 * 1024  # the largest file (60 000 images of 28x28) is 47 MB; bound what is read
MAX_LABEL_BYTES = 1 << 24  # MNIST's are 60 kB; a bigger file is not a label file


def idx_ndim(head: bytes) -> int | None:
    """How many dimensions (1 to 3) an IDX file of unsigned bytes starting with `head` declares; None:
    `head` does not start with such a magic."""
    return head[3] if len(head) >= 4 and head[:3] == IDX_MAGIC and 1 <= head[3] <= 3 else None


def idx_shape(head: bytes) -> tuple[int, ...] | None:
    """The shape an IDX file of unsigned bytes starting with `head` declares; None: no such magic, or
    `head` ends before the sizes do."""
    ndim = idx_ndim(head)
    if ndim is None or len(head) < 4 + 4 * ndim:
        return None
    return struct.unpack(f">{ndim}I", head[4:4 + 4 * ndim])


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes as a tensor of its shape.

    Read here rather than through torchvision's dataset classes: importing torchvision imports
    torch._dynamo, 1-2 s at every process start for a file format of a dozen lines."""
    try:
        size = path.stat().st_size
        if size > MAX_IDX_BYTES:
            raise DataError(f"{path} is over {MAX_IDX_BYTES >> 20} MiB: not an MNIST-format IDX file")
        blob = bytearray(size)  # read straight into the buffer the tensor will use: no copy of 47 MB
        with open(path, "rb") as f:
            del blob[f.readinto(blob):]  # a file that shrank since stat() is judged by what it holds
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc})") from None
    if idx_ndim(blob) is None:
        raise DataError(f"{path} is not a valid IDX file of unsigned bytes (bad header)")
    dims = idx_shape(blob)
    if dims is None:
        raise DataError(f"{path} is not a valid IDX file (truncated header)")
    header = 4 + 4 * len(dims)
    if len(blob) != header + math.prod(dims):
        raise DataError(f"{path} is not a valid IDX file ({len(blob) - header} bytes of data for shape {list(dims)})")
    count = math.prod(dims)
    return torch.frombuffer(blob, dtype=torch.uint8, offset=header, count=count).reshape(dims) if count \
        else torch.zeros(dims, dtype=torch.uint8)


def read_labels(path: Path) -> bytes:
    """The labels of an IDX label file, one byte each (preflight reads these, not the images)."""
    try:
        if os.path.getsize(path) > MAX_LABEL_BYTES:
            raise UserError(f"{path} is over {MAX_LABEL_BYTES >> 20} MiB: not an IDX label file")
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    if idx_shape(raw) != (len(raw) - 8,):
        raise UserError(f"{path} is not a valid IDX label file: replace it with a good copy")
    return raw[8:]


def check_images(path: Path, count: int, labels: Path) -> None:
    """An IDX image file's header and size, without reading the images: `count` 28x28 images (as many
    as `labels` holds). Truncated, empty, foreign or short files are refused here, before any W&B run."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            dims = idx_shape(f.read(16))
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    if dims is None or len(dims) != 3:
        raise UserError(f"{path} is not an IDX image file ({size} bytes, no image header): replace it with a good copy")
    if dims[1:] != (28, 28):
        raise UserError(f"{path} holds {dims[1]}x{dims[2]} images, not 28x28: replace it with a good copy")
    if dims[0] != count:
        raise UserError(f"{path} holds {dims[0]} images but {labels} has {count} labels: replace both with a good copy")
    if size != 16 + count * 28 * 28:
        raise UserError(f"{path} is {size} bytes, not the {16 + count * 28 * 28} its {count} images need "
                        "(truncated or padded): replace it with a good copy")


def _read(dataset: str, data_dir: str, train: bool) -> Split:
    folder = raw_folder(data_dir, dataset)
    prefix = "train" if train else "t10k"
    images, labels = _read_idx(folder / f"{prefix}-images-idx3-ubyte"), _read_idx(folder / f"{prefix}-labels-idx1-ubyte")
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{dataset} files in {folder} do not hold 28x28 uint8 images with labels")
    return Split(images.unsqueeze(1).contiguous(), labels.long())


# the last dataset load() built, kept on its device: a warm process's next trial reuses it (one entry, so a
# changed setting replaces it and device memory holds one copy at most)
_cache: dict[tuple, Dataset] = {}


def _files_key(folder: Path) -> tuple:
    """What says the files are the same ones: a file replaced or rewritten changes one of these."""
    key = []
    for name in FILES:
        st = (folder / name).stat()
        key.append((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(key)


def load(dataset: str, data_dir: str, val_size: int, train_stride: int, device: torch.device) -> Dataset:
    """Read the files once and move them to `device`.

    Training uses every `train_stride`-th of all the training images (the tutorial's subset: with 5,
    12 000 of 60 000). The per-epoch validation metric (so sweeps never tune on the test set) uses the
    last `val_size` of the images the stride leaves out; with train_stride 1 nothing is left out, so the
    last `val_size` images are held out of training instead.

    In one process the result is kept for the next call with the same dataset, files (same inode, size,
    modification and change times), split and device: nothing in it is written to by training.
    """
    folder = ensure(dataset, data_dir)
    try:
        key = (dataset, str(folder.resolve()), _files_key(folder), val_size, train_stride, str(device))
    except OSError as exc:
        raise DataError(f"cannot read {dataset} files in {folder} ({exc.strerror or exc})") from None
    if key in _cache:
        return _cache[key]
    _cache.clear()  # the old copy goes before the new one is moved to the device
    full, test = _read(dataset, data_dir, True), _read(dataset, data_dir, False)
    train_idx, val_idx = split_indices(len(full), val_size, train_stride, dataset)
    train = Split(full.images[train_idx], full.labels[train_idx])
    val = Split(full.images[val_idx], full.labels[val_idx])
    _, mean, std = DATASETS[dataset]
    move = lambda s: Split(s.images.to(device, non_blocking=True), s.labels.to(device, non_blocking=True))  # noqa: E731
    _cache[key] = Dataset(move(train), move(val), move(test), mean, std)
    return _cache[key]


def split_indices(n: int, val_size: int, train_stride: int, dataset: str = "the dataset") -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) indices into `n` training images; never overlapping."""
    every = torch.arange(n)
    if train_stride > 1:
        left_out = every[every % train_stride != 0]
        if val_size > len(left_out):
            raise DataError(f"val_size={val_size} must be at most the {len(left_out)} training images of {dataset} "
                            f"that train_stride={train_stride} leaves out")
        return every[::train_stride], left_out[len(left_out) - val_size:]
    if val_size >= n:
        raise DataError(f"val_size={val_size} must be smaller than the {n} training images of {dataset}")
    return every[:n - val_size], every[n - val_size:]


class Batches:
    """Normalised float batches of a device-resident split; reshuffled on the device every pass."""

    def __init__(self, split: Split, batch_size: int, mean: float, std: float, *, shuffle: bool,
                 generator: torch.Generator | None = None, channels_last: bool = False):
        self.split, self.batch_size, self.shuffle, self.generator = split, batch_size, shuffle, generator
        # x/255 then (x - mean)/std folded into one multiply-add
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This pass's batches from its example `first` on: a run resumed mid-epoch restores the generator
        to the epoch's start, draws the same order and skips the examples it trained before the stop."""
        for x, y, _ in self.shards_from(first):
            yield x, y

    def shards_from(self, first: int, rank: int = 0, ranks: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(x, y, examples in the whole batch): rank `rank`'s share of each batch of `ranks` ranks. Every rank
        draws the same order (same generator state) and takes its slice of each batch, so the ranks
        together train on exactly the batches one rank would (a short last batch may leave a rank none)."""
        n, device = len(self.split), self.split.labels.device
        order = torch.randperm(n, device=device, generator=self.generator) if self.shuffle else None
        share = self.batch_size // ranks
        for start in range(first, n, self.batch_size):
            total = min(self.batch_size, n - start)
            lo, hi = start + min(rank * share, total), start + min((rank + 1) * share, total)
            if order is None:
                x, y = self.split.images[lo:hi], self.split.labels[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.split.images[idx], self.split.labels[idx]
            x = x.float().mul_(self.scale).add_(self.shift).contiguous(memory_format=self.memory_format)
            yield x, y, total


def shard(split: Split, rank: int, ranks: int) -> Split:
    """Rank `rank`'s contiguous part of a split that the ranks evaluate together (their sums add up)."""
    lo, hi = len(split) * rank // ranks, len(split) * (rank + 1) // ranks
    return Split(split.images[lo:hi], split.labels[lo:hi])
