"""Shared fixtures: a clean environment for `python -m app` subprocesses, small and real datasets.

Every subprocess gets an environment stripped of the caller's W&B and training settings, with no API
key anywhere (NETRC points at nothing) and an HTTP(S) proxy that refuses connections: nothing a test
starts can reach the internet or a W&B account, so the tests behave the same on a laptop and in CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from idx import copy_with_short_test_set, write_dataset  # tests/ is on sys.path under pytest (no package)

from app.config import KEYS

# The files that take longest on CI's two workers (`--dist loadfile`, each file on one worker), longest
# first. Handed out before the rest so the two workers end together: xdist otherwise orders files by how
# many tests they hold, which put these few-but-long files last and left one worker running them alone
# for minutes. pyproject.toml's addopts turn xdist's reordering off so this order is the one used.
LONG_FIRST = ("test_slurm.py", "test_warm_agent.py", "test_offline_sweep.py", "test_readme.py", "test_launch.py",
              "test_bench.py", "test_preempt.py", "test_faults_settings.py", "test_faults_state.py",
              "test_ranks_agents.py", "test_report.py", "test_container.py", "test_faults_container.py",
              "test_wandb_stops.py", "test_bench_trials.py", "test_warm_agent_container.py")


def pytest_collection_modifyitems(config, items):
    """Files in LONG_FIRST's order, then the rest by test count, as xdist would; a file's own tests keep
    their order (the sort is stable), so its module fixtures are made once."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    count: dict[str, int] = {}
    for item in items:
        count[item.path.name] = count.get(item.path.name, 0) + 1
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -count[item.path.name], item.path.name))

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, connections fail at once
LOOPBACK = "localhost,127.0.0.1,::1"
SETTINGS = {k.upper() for k in KEYS}


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") and k not in SETTINGS and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    env.update(
        NETRC=str(tmp / "no-netrc"),  # no `wandb login` key from the host
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        http_proxy=REFUSED, https_proxy=REFUSED, HTTP_PROXY=REFUSED, HTTPS_PROXY=REFUSED,
        no_proxy=LOOPBACK, NO_PROXY=LOOPBACK,  # local stand-ins (a fake W&B API) are still reachable
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_app(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m app ARGS` as a user runs it (cwd decides which .env is read)."""
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def wait_for(predicate, timeout: float, what: str, details=None):
    """Poll `predicate` until it returns something true (returned), or fail naming `what` (and, from
    `details()`, what else explains it: container logs...)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{details()}" if details else ""))


def saved_checkpoint(path: Path) -> dict | None:
    """A run's checkpoint as training left it, None while there is none yet (it is written by rename)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


@contextlib.contextmanager
def volume(path: Path, size: str = "4m") -> Iterator[Path]:
    """A file system of its own at `path` (a small tmpfs): to fill to the brim, or to turn read-only."""
    if os.getuid() != 0:
        message = "mounting a file system needs root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI runs as root)")
        pytest.skip(message)
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], timeout=30)


def fill(folder: Path) -> None:
    """Fill the file system under `folder` to the last byte."""
    # unbuffered: a buffered file's close() would raise ENOSPC again for the bytes still in its buffer
    with open(folder / ".filler", "wb", buffering=0) as f:
        for block in (b"\0" * 65536, b"\0"):  # big blocks, then the last partial one byte by byte
            with contextlib.suppress(OSError):
                while f.write(block):
                    pass


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return clean_env(tmp_path)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A DATA_DIR with 1200 training and 200 test images of MNIST's format (unpacked IDX)."""
    root = tmp_path_factory.mktemp("small-data")
    write_dataset(root, "mnist", n_train=1200, n_test=200)
    return root


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    """A DATA_DIR holding the real Fashion-MNIST archives in torchvision's layout (still gzipped)."""
    files = sorted(FASHION_MNIST.glob("*-ubyte.gz"))
    if len(files) != 4:
        message = f"real Fashion-MNIST not found in {FASHION_MNIST}: apt-get install dataset-fashion-mnist"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI must run the real-data tests)")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("fashion-data")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, raw / f.name)
    return root


@pytest.fixture(scope="session")
def fashion_dir_1k_test(fashion_dir, tmp_path_factory) -> Path:
    """fashion_dir with its test set cut to the first 1000 of its 10 000 images (training images all there):
    every run ends on the whole test set, ~1 s a run on CI's shared CPU, for tests whose assertions do
    not depend on its size. Not for a test that stops a run during its test phase (it needs the long one)."""
    root = tmp_path_factory.mktemp("fashion-data-1k-test")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    copy_with_short_test_set(sorted((fashion_dir / "FashionMNIST" / "raw").glob("*-ubyte.gz")), raw, 1000)
    return root


# --- one real run with every layer of settings, as a `wandb agent` child gets them ---
LAYERED_RUN_ID = "layers01"
SWEEP_PARAMS = """wandb_version: 1

learning_rate:
  value: 0.01
epochs:
  value: 1
kernels:
  value:
  - 8
  - 16
"""


@pytest.fixture(scope="session")
def layered_run(tmp_path_factory, small_data):
    """`python -m app train` with .env, environment, --key=value and a sweep's parameters all set.

    `wandb agent` starts each run with WANDB_RUN_ID, WANDB_SWEEP_ID and WANDB_SWEEP_PARAM_PATH (a YAML
    of {key: {value: v}} that wandb.init reads into run.config over the code's values) and passes
    the same parameters as --key=value; here the command line disagrees with the sweep on purpose.
    No API key and no WANDB_MODE: the run must go offline on its own.
    """
    cwd = tmp_path_factory.mktemp("layered")
    (cwd / ".env").write_text("SEED=5\nBATCH_SIZE=16\nLOG_INTERVAL=7\nLEARNING_RATE=0.1\nEPOCHS=4\n")
    params = cwd / "sweep" / f"config-{LAYERED_RUN_ID}.yaml"
    params.parent.mkdir()
    params.write_text(SWEEP_PARAMS)
    env = clean_env(
        cwd, BATCH_SIZE="32", LOG_INTERVAL="5", LEARNING_RATE="0.05", VAL_SIZE="200",
        DATA_DIR=str(small_data), OUTPUT_DIR=str(cwd / "outputs"), WANDB_DIR=str(cwd / "runs"),
        WANDB_RUN_ID=LAYERED_RUN_ID, WANDB_SWEEP_ID="sweep-test", WANDB_SWEEP_PARAM_PATH=str(params),
    )
    proc = run_app(["train", "--log_interval=3", "--learning-rate", "0.02", "--epochs=3"], env, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc
