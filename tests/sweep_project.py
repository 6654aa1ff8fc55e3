"""Helpers for the sweep-agent container tests: a compose project on real Fashion-MNIST, pointed at the
stand-in W&B API (tests/fake_wandb.py) that the test serves on the host's loopback.

    from sweep_project import agent_logs, compose_files, fashion_project, write_env
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import FASHION_MNIST, REPO
from containers import COMPOSE_FILES, CONTAINER_GID, CONTAINER_UID, compose, project_dir
from fake_wandb import FakeWandb
from idx import copy_with_short_test_set

# containers share the host's network, so WANDB_BASE_URL=http://127.0.0.1:PORT reaches the stand-in
HOST_NETWORK = str(REPO / "tests" / "compose.host-network.yml")
compose_files = (*COMPOSE_FILES, HOST_NETWORK)
TEST_IMAGES = 1000  # of the test set's 10 000: see fashion_project
LOG_LINE = re.compile(r"^(?P<container>[\w.-]+)\s+\| (?P<text>.*)$")


def fashion_project(base: Path) -> Path:
    """A compose project folder whose data/ holds Fashion-MNIST as Debian ships it (gzipped), but for its
    test set: the first 1000 of the 10 000 images. Every run in a container ends on the whole test set;
    these tests check that it ran and scored, never its size (none stops a run in its test phase)."""
    files = sorted(FASHION_MNIST.glob("*-ubyte.gz"))
    if len(files) != 4:
        pytest.fail(f"real Fashion-MNIST missing from {FASHION_MNIST}: apt-get install dataset-fashion-mnist")
    project = project_dir(base)
    raw = project / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    copy_with_short_test_set(files, raw, TEST_IMAGES)
    if os.getuid() == 0:  # the containers unpack the archives as their own user
        for path in (project / "data" / "FashionMNIST", raw, *raw.iterdir()):
            os.chown(path, CONTAINER_UID, CONTAINER_GID)
    return project


def write_env(project: Path, api: FakeWandb, **settings: str) -> None:
    """The project's .env: what a user writes, pointed at the stand-in instead of api.wandb.ai."""
    lines = {
        "SWEEP_ID": api.sweep_path, "WANDB_BASE_URL": api.url, "WANDB_API_KEY": "k" * 40,
        "AGENT_RUN_MODE": "offline",  # the agent talks to the stand-in; its runs stay on disk
        "DATASET": "fashion_mnist", "EPOCHS": "1", "TRAIN_STRIDE": "50", "VAL_SIZE": "1000", "WATCH_LOG": "none",
        **settings,
    }
    (project / ".env").write_text("".join(f"{k}={v}\n" for k, v in lines.items()))


def agent_logs(project: Path, service: str = "agent") -> dict[str, list[str]]:
    """Each container's log lines, by compose's prefix (agent-1, agent-2, ...)."""
    out = compose("logs", "--no-color", service, project=project, files=compose_files)
    logs: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        m = LOG_LINE.match(line)
        if m:
            logs.setdefault(m["container"], []).append(m["text"])
    return logs


def joined(logs: dict[str, list[str]]) -> str:
    return "\n".join(f"{c} | {t}" for c, lines in logs.items() for t in lines)
