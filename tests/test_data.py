"""Data: small IDX files written here (plain and gzipped), missing and broken files, splits, batches."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFUSED
from idx import synthetic, write_dataset, write_idx

from app import data
from app.data import DATASETS, FILES, Batches, DataError, Split
from app.errors import UserError

CPU = torch.device("cpu")


def raw(root: Path, dataset: str = "mnist") -> Path:
    return root / DATASETS[dataset][0] / "raw"


@pytest.fixture
def offline(monkeypatch):
    """Downloads go to a proxy that refuses connections: the "no internet" of CI, made certain."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, REFUSED)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_load_splits_and_contents(tmp_path: Path, gz: bool):
    arrays = write_dataset(tmp_path, n_train=1200, n_test=200, gz=gz)
    assert data.ensure("mnist", tmp_path) == raw(tmp_path)
    ds = data.load("mnist", str(tmp_path), val_size=200, train_stride=5, device=CPU)
    train_x, train_y, test_x, test_y = (torch.from_numpy(arrays[f].astype(np.int64)) for f in FILES)
    # training: every 5th of all 1200 (the tutorial's subset); validation: the last 200 of the 960 images
    # that stride leaves out; test: all of t10k
    assert (len(ds.train), len(ds.val), len(ds.test)) == (240, 200, 200)
    assert ds.train.images.shape == (240, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels.dtype == torch.int64
    assert torch.equal(ds.train.images[:, 0].long(), train_x[::5])
    assert torch.equal(ds.train.labels, train_y[::5])
    left_out = [i for i in range(1200) if i % 5][-200:]
    assert torch.equal(ds.val.images[:, 0].long(), train_x[left_out])
    assert torch.equal(ds.val.labels, train_y[left_out])
    assert torch.equal(ds.test.images[:, 0].long(), test_x) and torch.equal(ds.test.labels, test_y)
    assert (ds.mean, ds.std) == (0.1307, 0.3081)
    if gz:  # unpacked next to the archives, no partial files left behind
        assert all((raw(tmp_path) / f).is_file() for f in FILES)
        assert not list(raw(tmp_path).glob("*.part"))


@pytest.mark.parametrize("val_size, stride, sizes", [
    (0, 1, (1200, 0)),
    (200, 1, (1000, 200)),  # stride 1 leaves nothing out: the validation images are held out of training
    (200, 3, (400, 200)),  # stride > 1: training is every 3rd of all 1200 whatever val_size is
    (0, 5, (240, 0)),
    (960, 5, (240, 960)),  # every image the stride leaves out
    (1199, 1, (1, 1199)),
])
def test_split_sizes(small_data: Path, val_size, stride, sizes):
    ds = data.load("mnist", str(small_data), val_size=val_size, train_stride=stride, device=CPU)
    assert (len(ds.train), len(ds.val)) == sizes


@pytest.mark.parametrize("n, val_size, stride", [(60_000, 5000, 5), (60_000, 5000, 1), (1200, 7, 3), (10, 9, 1), (10, 5, 2)])
def test_training_and_validation_never_share_an_image(n, val_size, stride):
    train, val = data.split_indices(n, val_size, stride)
    assert len(set(train.tolist()) | set(val.tolist())) == len(train) + len(val)
    assert len(val) == val_size
    if stride > 1:
        assert torch.equal(train, torch.arange(0, n, stride))  # exactly the tutorial's subset


def test_the_tutorial_config_trains_on_its_12000_images():
    train, val = data.split_indices(60_000, 5000, 5)
    assert len(train) == 12_000 and train[-1] == 59_995 and len(val) == 5000 and val[-1] == 59_999


@pytest.mark.parametrize("val_size, stride, message", [
    (1200, 1, "val_size=1200 must be smaller than the 1200 training images of mnist"),
    (961, 5, "val_size=961 must be at most the 960 training images of mnist that train_stride=5 leaves out"),
])
def test_val_size_bigger_than_what_is_there(small_data: Path, val_size, stride, message):
    with pytest.raises(DataError) as exc:
        data.load("mnist", str(small_data), val_size=val_size, train_stride=stride, device=CPU)
    assert _one_line(exc) == message


def test_fashion_mnist_uses_its_own_folder_and_statistics(tmp_path: Path):
    write_dataset(tmp_path, "fashion_mnist", n_train=300, n_test=50)
    ds = data.load("fashion_mnist", str(tmp_path), val_size=100, train_stride=1, device=CPU)
    assert (len(ds.train), ds.mean, ds.std) == (200, 0.2860, 0.3530)
    assert not (tmp_path / "MNIST").exists()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, "a user error is one line"
    return message


def test_missing_files_without_network_say_where_to_put_what(tmp_path: Path, offline):
    start = time.monotonic()
    with pytest.raises(DataError) as exc:
        data.ensure("mnist", tmp_path / "data")
    assert time.monotonic() - start < 10, "no long hang when the download cannot work"
    message = _one_line(exc)
    assert str(raw(tmp_path / "data")) in message
    for f in FILES:
        assert f in message
    # the offline way in the same line: Debian's Fashion-MNIST, used without any download
    assert "apt-get install dataset-fashion-mnist and set DATASET=fashion_mnist" in message


def test_some_files_missing_is_the_same_error(tmp_path: Path, offline):
    write_dataset(tmp_path, n_train=100, n_test=10)
    (raw(tmp_path) / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as exc:
        data.ensure("mnist", tmp_path)
    assert "t10k-labels-idx1-ubyte" in _one_line(exc)


@pytest.fixture
def silent_proxy(monkeypatch):
    """A proxy that accepts connections and never answers: the hang a firewall that drops packets causes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    yield
    stop.set()
    thread.join()
    for s in accepted:
        s.close()
    server.close()


def test_a_silent_network_times_out(tmp_path: Path, silent_proxy, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 1)
    before = socket.getdefaulttimeout()
    start = time.monotonic()
    with pytest.raises(DataError) as exc:
        data.ensure("mnist", tmp_path)
    assert time.monotonic() - start < 8  # one timeout per mirror tried, not a hang
    assert "train-images-idx3-ubyte.gz" in _one_line(exc)
    assert socket.getdefaulttimeout() == before  # the process-wide timeout is put back


def test_system_copy_of_fashion_mnist_is_used_before_any_download(tmp_path: Path, fashion_dir, offline):
    folder = data.ensure("fashion_mnist", tmp_path)
    assert all((folder / f).stat().st_size > 0 for f in FILES)
    labels = data.load("fashion_mnist", str(tmp_path), val_size=5000, train_stride=1, device=CPU).test.labels
    assert len(labels) == 10_000 and set(labels.tolist()) == set(range(10))


def test_dataset_statistics_match_the_real_training_images(fashion_dir: Path):
    ds = data.load("fashion_mnist", str(fashion_dir), val_size=0, train_stride=1, device=CPU)
    pixels = ds.train.images.double() / 255
    assert len(ds.train) == 60_000
    assert abs(pixels.mean().item() - DATASETS["fashion_mnist"][1]) < 5e-4
    assert abs(pixels.std().item() - DATASETS["fashion_mnist"][2]) < 5e-4


# --- broken files: one clear line, never a traceback ---

def _break(tmp_path: Path, how: str) -> None:
    folder = raw(tmp_path)
    target = folder / "train-images-idx3-ubyte"
    if how == "garbage header":
        target.write_bytes(b"this is not an IDX file at all" * 10)
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:5000])
    elif how == "labels do not match":
        write_idx(folder / "train-labels-idx1-ubyte", np.zeros(99, np.uint8))
    elif how == "labels are images":
        write_idx(folder / "train-labels-idx1-ubyte", np.zeros((100, 28, 28), np.uint8))
    elif how == "not 2-d images":
        write_idx(target, np.zeros((100, 784), np.uint8))
    elif how == "32x32 images":
        write_idx(target, np.zeros((100, 32, 32), np.uint8))
    elif how == "empty":
        target.write_bytes(b"")


@pytest.mark.parametrize("how", ["garbage header", "truncated", "labels do not match", "labels are images",
                                 "not 2-d images", "32x32 images", "empty"])
def test_corrupted_file(tmp_path: Path, how: str):
    write_dataset(tmp_path, n_train=100, n_test=10)
    _break(tmp_path, how)
    with pytest.raises(DataError) as exc:
        data.load("mnist", str(tmp_path), val_size=10, train_stride=1, device=CPU)
    assert str(raw(tmp_path)) in _one_line(exc)


@pytest.mark.parametrize("shape", [(7,), (3, 28, 28), (2, 784)])
def test_one_header_parser_serves_every_idx_reader(tmp_path: Path, shape: tuple):
    """The shape a header declares, read the same way by the training reader and the preflight checks."""
    blob = write_idx(tmp_path / "f", np.arange(np.prod(shape), dtype=np.uint64).reshape(shape) % 251).read_bytes()
    assert data.idx_shape(blob) == shape
    assert data.idx_shape(blob[:3 + 4 * len(shape)]) is None  # the sizes cut short
    assert data.idx_shape(b"\0\0\x0d" + blob[3:]) is None  # 0x0d: floats, not unsigned bytes
    assert tuple(data._read_idx(tmp_path / "f").shape) == shape
    if len(shape) == 1:
        assert data.read_labels(tmp_path / "f") == blob[8:]
    else:
        with pytest.raises(UserError, match="is not a valid IDX label file"):
            data.read_labels(tmp_path / "f")
    if shape == (3, 28, 28):
        data.check_images(tmp_path / "f", 3, tmp_path / "labels")
        with pytest.raises(UserError, match="holds 3 images but .* has 4 labels"):
            data.check_images(tmp_path / "f", 4, tmp_path / "labels")
    else:
        with pytest.raises(UserError, match="is not an IDX image file"):
            data.check_images(tmp_path / "f", shape[0], tmp_path / "labels")


@pytest.mark.parametrize("how", ["not gzip", "truncated gzip"])
def test_corrupted_archive(tmp_path: Path, how: str, offline):
    write_dataset(tmp_path, n_train=100, n_test=10, gz=True)
    archive = raw(tmp_path) / "train-images-idx3-ubyte.gz"
    blob = archive.read_bytes()
    archive.write_bytes(b"not gzip" * 100 if how == "not gzip" else blob[: len(blob) // 2])
    with pytest.raises(DataError) as exc:
        data.ensure("mnist", tmp_path)
    message = _one_line(exc)
    assert str(archive) in message and "writable" not in message  # names the bad file, blames nothing else
    assert not (raw(tmp_path) / "train-images-idx3-ubyte").exists()  # nothing truncated under the real name
    assert not list(raw(tmp_path).glob("*.part"))


# --- batches ---

def _numbered_split(n: int) -> Split:
    """Image i carries i in its first two pixels, so a batch tells which images it holds."""
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) // 256
    images[:, 0, 0, 1] = torch.arange(n) % 256
    return Split(images, torch.arange(n) % 10)


def _ids(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    pixels = torch.round((x[:, 0, 0, :2] * std + mean) * 255).long()
    return pixels[:, 0] * 256 + pixels[:, 1]


@pytest.mark.parametrize("n, batch_size", [(300, 64), (256, 64), (5, 128)])
def test_shuffled_batches_are_a_permutation(n, batch_size):
    split = _numbered_split(n)
    batches = Batches(split, batch_size, 0.1307, 0.3081, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(batches) == -(-n // batch_size)
    passes = []
    for _ in range(2):
        sizes, ids, labels = [], [], []
        for x, y in batches:
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
            sizes.append(len(y))
            ids.append(_ids(x, 0.1307, 0.3081))
            labels.append(y)
        ids_t = torch.cat(ids)
        assert sorted(ids_t.tolist()) == list(range(n))  # every image exactly once
        assert torch.equal(torch.cat(labels), ids_t % 10)  # labels travel with their images
        assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
        passes.append(ids_t)
    if n > 5:
        assert not torch.equal(passes[0], passes[1]), "each pass is reshuffled"
        assert not torch.equal(passes[0], torch.arange(n))


def test_the_same_seed_gives_the_same_order():
    split = _numbered_split(300)
    orders = []
    for _ in range(2):
        batches = Batches(split, 64, 0.0, 1.0, shuffle=True, generator=torch.Generator().manual_seed(7))
        orders.append(torch.cat([_ids(x, 0.0, 1.0) for x, _ in batches]))
    assert torch.equal(*orders)


def test_unshuffled_batches_keep_the_order():
    split = _numbered_split(300)
    ids = torch.cat([_ids(x, 0.5, 0.25) for x, _ in Batches(split, 128, 0.5, 0.25, shuffle=False)])
    assert torch.equal(ids, torch.arange(300))


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_normalisation(dataset):
    _, mean, std = DATASETS[dataset]
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 28, 28).contiguous()
    split = Split(images, torch.zeros(3, dtype=torch.long))
    [(x, _)] = list(Batches(split, 8, mean, std, shuffle=False))
    want = torch.tensor([(0 - mean) / std, (0.2 - mean) / std, (1 - mean) / std])
    torch.testing.assert_close(x[:, 0, 5, 5], want, rtol=0, atol=1e-6)
    # over real-looking images the result has roughly zero mean and unit spread
    images, _ = synthetic(500)
    split = Split(torch.from_numpy(images).unsqueeze(1), torch.zeros(500, dtype=torch.long))
    stats = torch.from_numpy(images).double() / 255
    [(x, _)] = list(Batches(split, 500, stats.mean().item(), stats.std().item(), shuffle=False))
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_channels_last_batches():
    split = _numbered_split(10)
    [(x, _)] = list(Batches(split, 10, 0.1, 0.3, shuffle=False, channels_last=True))
    assert x.is_contiguous(memory_format=torch.channels_last)
