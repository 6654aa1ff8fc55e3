"""README.md's own commands, walked in order on a fresh checkout, as a new user follows them.

Every command is copied out of README.md (and, for the bundle, docs/airgap.md) by its text, never typed
here, so the README cannot drift from what works. The only differences from what a user types are in
ADAPTATIONS below, applied by adapt(): what a test host without internet, GPU or spare cores needs.

Steps (each timed; the times are printed at the end):
  1. `scripts/venv && .venv/bin/python -m app train`: the venv is there (its lock stamp), one offline run
  2. `WANDB_MODE=offline SWEEP_CONFIG=/app/sweeps/grid.yaml docker compose up agent --scale agent=N`
  3. `.venv/bin/python -m app offline-agent --config sweeps/grid.yaml`: the host agent finishes the grid
     the container agents started, in the same runs/ (one layout)
  4. `sweep-status` and 5. `report`, with no arguments
  6. docs/airgap.md: `bundle save`, then `bundle load` on the "air-gapped host" (the image removed first)
  7. the air-gapped `docker compose ... run --rm train`: runs the loaded image (IMAGE= from the bundled
     .env), never builds one
README's `python -m app sync` (an upload to wandb.ai) and `bash .ci/run` (what runs this test) are not run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import FASHION_MNIST, REPO, clean_env
from containers import _CALLER_SETTINGS, TEST_IMAGE, app_image, docker  # noqa: F401  (session fixture)

from app import runlog

pytestmark = pytest.mark.container

PROJECT = f"mnist-sweeps-readme-{os.getpid()}"  # our own containers on an engine others use too
BUNDLE_TAG = f"mnist-sweeps:readme-{os.getpid()}"  # the image carried: a tag of TEST_IMAGE we may remove
TINY = "EPOCHS=1 TRAIN_STRIDE=50 VAL_SIZE=500 WATCH_LOG=none"

# Every way the test's commands differ from the README's: (which commands, README's text, the test's, why).
# "in front of X" puts the test's text before each X (environment variables for that command).
ADAPTATIONS = (
    ("app", "in front of .venv/bin/python -m app", "DATASET=fashion_mnist",
     "no internet: README's own advice (Debian's Fashion-MNIST, used without a download)"),
    ("app", "in front of .venv/bin/python -m app", f"{TINY} DEVICE=cpu", "time: one short epoch on the CPU"),
    ("airgap", "python -m app", ".venv/bin/python -m app", "the venv's python (README's form; airgap.md's `python` is an activated venv)"),
    ("airgap", "mnist-sweeps:latest", BUNDLE_TAG, "carry the image .ci/run built, under a tag the test may remove"),
    ("airgap", "~/mnist", "airgapped", "the air-gapped host's folder, inside the test's temporary folder"),
    ("compose", "in front of docker compose", f"IMAGE={TEST_IMAGE}", "the image .ci/run built (README: set IMAGE=X)"),
    ("compose", "in front of docker compose", "COMPOSE_FILE=docker-compose.yml:docker-compose.cpu.yml",
     "no NVIDIA runtime on a test host (docs/containers.md)"),
    ("compose", "in front of docker compose", "AGENT_COUNT=1",
     "time: one grid point per agent; the host agent then trains the rest of sweeps/grid.yaml"),
    ("compose", "agent=4", "agent=2", "this host has 2 cores"),
    ("compose", "before the command", "export UID GID=$(id -g) &&", "files in ./runs belong to the user (docs/containers.md)"),
    ("compose", ".env", f"DATASET=fashion_mnist {TINY}", "the training settings containers get, as a user puts them in .env"),
    ("all compose", "in front of docker compose", f"COMPOSE_PROJECT_NAME={PROJECT}", "our own containers on a shared engine"),
)


def adapt(command: str, kind: str) -> str:
    """README's COMMAND (a line of kind app, compose or airgap) as the test runs it, per ADAPTATIONS."""
    for scope, readme, ours, _why in ADAPTATIONS:
        if scope not in (kind, "all compose" if "docker compose" in command else None) or readme == ".env":
            continue
        if readme == "before the command":
            command = f"{ours} {command}"
        elif readme.startswith("in front of "):
            target = readme.removeprefix("in front of ")
            command = command.replace(target, f"{ours} {target}")
        elif readme == "python -m app":
            command = re.sub(r"(?<![\w/])python -m app", ours, command)
        else:
            command = command.replace(readme, ours)
    return command


def dotenv() -> str:
    """The checkout's .env for the container steps: the one ADAPTATIONS row that is a file, not a command."""
    (ours,) = [ours for _s, readme, ours, _w in ADAPTATIONS if readme == ".env"]
    return "".join(f"{word}\n" for word in ours.split())


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, re.S | re.M)


def command_line(markdown: str, text: str) -> str:
    """The one command line of a ```bash block that contains TEXT (a trailing `# comment` dropped)."""
    found = [line for block in bash_blocks(markdown) for line in block.splitlines() if text in line]
    assert len(found) == 1, f"README: {len(found)} command lines contain {text!r}: {found}"
    return re.sub(r"\s+#.*$", "", found[0]).strip()


class Steps:
    """Runs the adapted commands with bash in one folder and times each step."""

    def __init__(self, env: dict[str, str]):
        self.env, self.times = env, []

    def run(self, name: str, command: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        print(f"$ {command}")
        t0 = time.monotonic()
        proc = subprocess.run(["bash", "-c", f"set -eo pipefail; {command}"], cwd=cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        self.times.append((name, time.monotonic() - t0))
        assert proc.returncode == 0, f"{name}: {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc


def test_readme_commands_work_as_written_on_a_fresh_checkout(app_image, tmp_path: Path, record_property, capsys):
    checkout = tmp_path / "checkout"  # committed files only: what a user gets (commit before running this)
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(checkout)], check=True, timeout=120)
    readme = (checkout / "README.md").read_text()
    airgap = (checkout / "docs" / "airgap.md").read_text()
    # the repository's venv stands in for scripts/venv's: it returns at once when the lock stamp matches.
    # It must never install here: `pip install --editable` from the clone would repoint the shared venv.
    locks = b"".join((checkout / p).read_bytes() for p in
                     ("requirements/torch.txt", "requirements/app.txt", "requirements/dev.txt", "pyproject.toml"))
    stamp = REPO / ".venv" / f".locks-{hashlib.sha256(locks).hexdigest()[:16]}"  # as scripts/venv names it
    if not stamp.exists():
        pytest.fail(f"{REPO / '.venv'} is not up to date with the locks (no {stamp.name}): run scripts/venv there first",
                    pytrace=False)
    (checkout / ".venv").symlink_to(REPO / ".venv")
    stamp_time = stamp.stat().st_mtime_ns
    env = {k: v for k, v in clean_env(tmp_path).items() if k not in _CALLER_SETTINGS}
    steps = Steps(env)
    try:
        walk(steps, readme, airgap, checkout, stamp, stamp_time)
    finally:
        subprocess.run(["docker", "compose", "--project-name", PROJECT, "down", "--remove-orphans"], cwd=checkout,
                       env=env, capture_output=True, timeout=120)
        docker("rmi", BUNDLE_TAG)  # only the tag: TEST_IMAGE keeps every layer
        (checkout / "mnist-sweeps-bundle.tar").unlink(missing_ok=True)  # 6 GB: pytest keeps old tmp folders
        report = "\n".join(f"  {name:<34} {took:6.1f} s" for name, took in steps.times)
        total = sum(took for _n, took in steps.times)
        with capsys.disabled():  # shown without -s: each step's time on this host
            print(f"\nREADME steps on this host:\n{report}\n  {'total':<34} {total:6.1f} s")
        for name, took in steps.times:
            record_property(name, round(took, 1))


def walk(steps: Steps, readme: str, airgap: str, checkout: Path, stamp: Path, stamp_time: int) -> None:
    # 1. Quick start: the venv, then one offline run
    quick = command_line(readme, "scripts/venv")
    assert quick == "scripts/venv && .venv/bin/python -m app train", quick  # the line this step is about
    train = steps.run("venv + offline run", adapt(quick, "app"), checkout)
    assert stamp.stat().st_mtime_ns == stamp_time, "scripts/venv reinstalled instead of finding its lock stamp"
    printed = train.stdout + train.stderr
    saved = re.search(r"^W&B offline run saved in (runs/wandb/offline-run-\S+)\n  upload it with: python -m app sync \1$",
                      printed, re.M)
    assert saved, printed[-3000:]
    run = runlog.read(checkout / saved[1])
    assert run.exit_code == 0 and run.config["dataset"] == "fashion_mnist" and 0.3 < run.summary["test_accuracy"] <= 1
    assert train.stderr.rstrip().endswith(saved[0]), "our upload line is not the last word on stderr"

    # 2. The offline sweep in containers, on the grid of sweeps/grid.yaml as the image holds it
    for name in ("data", "runs", "outputs"):  # docs/containers.md: mkdir -p data runs outputs
        (checkout / name).mkdir(exist_ok=True)
    # containers cannot see /usr/share: the dataset goes into ./data (the first run may have unpacked it there)
    shutil.copytree(FASHION_MNIST, checkout / "data" / "FashionMNIST" / "raw", dirs_exist_ok=True)
    (checkout / ".env").write_text(dotenv())
    up = command_line(readme, "SWEEP_CONFIG=/app/sweeps/grid.yaml docker compose up agent")
    assert up.startswith("WANDB_MODE=offline "), up
    steps.run("compose: 2 offline agents", adapt(up, "compose"), checkout)
    in_containers = {f.name for f in runlog.find(checkout / "runs")} - {Path(saved[1]).name}
    assert len(in_containers) == 2, in_containers  # one trial per agent (AGENT_COUNT=1)
    journal = checkout / "runs" / "sweeps" / "mnist-grid.journal"
    assert journal.is_file(), sorted(p.name for p in (checkout / "runs").rglob("*"))

    # 3. One agent on the host: the same sweep, the same journal and runs folder
    agent = steps.run("host: offline-agent", adapt(command_line(readme, "offline-agent --config"), "app"), checkout)
    assert re.search(r"^\[offline-sweep\] best so far: trial \d", agent.stdout.strip().splitlines()[-1]), agent.stdout[-2000:]
    assert not (checkout / "sweeps" / "mnist-grid.journal").exists()  # never in the source tree
    trials = [runlog.read(f) for f in runlog.find(checkout / "runs") if f.name != Path(saved[1]).name]
    points = sorted((r.config["learning_rate"], r.config["batch_size"]) for r in trials if r.exit_code == 0)
    assert points == [(lr, bs) for lr in (0.001, 0.005, 0.02) for bs in (64, 128)], points  # each once

    # 4. sweep-status with no arguments: every grid point, the best trial and its command
    status = steps.run("sweep-status", adapt(command_line(readme, "-m app sweep-status"), "app"), checkout)
    assert "sweep mnist-grid: grid, maximize val_accuracy" in status.stdout, status.stdout
    assert "6 of 6 grid points done" in status.stdout, status.stdout
    rows = re.findall(r"^\d+ +COMPLETE +(\d+) +([\d.]+) +[\d.]+ +\w+ +1 +[\d.]+ +(\S+):\d+ *$", status.stdout, re.M)
    assert sorted((float(lr), int(bs)) for bs, lr, _agent in rows) == points, status.stdout
    # one table for both: two container agents (their hostnames) and the host's agent
    hosts = Counter(agent for _bs, _lr, agent in rows)
    assert hosts.pop(socket.gethostname()) == 4 and sorted(hosts.values()) == [1, 1], status.stdout
    assert re.search(r"^best: trial \d+ val_accuracy 0\.\d{4}", status.stdout, re.M), status.stdout
    assert "train it again with:\npython -m app train --learning_rate=" in status.stdout, status.stdout

    # 5. report with no arguments: a page in report/
    steps.run("report", adapt(command_line(readme, "-m app report"), "app"), checkout)
    page = (checkout / "report" / "index.html").read_text()
    assert "mnist-grid" in page and page.count("offline-run-") >= 7  # the single run and the six trials

    # 6. docs/airgap.md: the bundle, saved here and loaded on the "air-gapped host"
    assert docker("tag", TEST_IMAGE, BUNDLE_TAG).returncode == 0
    image_id = docker("image", "inspect", "--format", "{{.Id}}", BUNDLE_TAG).stdout.strip()
    save = command_line(airgap, "-m app bundle save")
    assert save.endswith("--image mnist-sweeps:latest --data data --env .env"), save
    steps.run("bundle save", adapt(save, "airgap"), checkout)
    assert docker("rmi", BUNDLE_TAG).returncode == 0  # the air-gapped host does not have it
    (load,) = re.findall(r"`(python -m app bundle load [^`]+)`", airgap.replace("\n", " "))
    loaded = steps.run("bundle load", adapt(load, "airgap"), checkout)
    assert f"loaded image {BUNDLE_TAG}" in loaded.stdout, loaded.stdout
    assert docker("image", "inspect", "--format", "{{.Id}}", BUNDLE_TAG).stdout.strip() == image_id
    host = checkout / "airgapped"
    assert f"IMAGE={BUNDLE_TAG}" in (host / ".env").read_text().splitlines()  # the tag it was saved with
    assert (host / "docs" / "airgap.md").is_file() and (host / "data" / "FashionMNIST" / "raw").is_dir()

    # 7. The air-gapped run: compose runs the loaded image (IMAGE from the bundled .env), never builds one
    export = command_line(airgap, "export UID")
    one_run = command_line(airgap, "run --rm train")
    assert "docker-compose.cpu.yml" in one_run, one_run
    files = [w for w in shlex.split(one_run) if w.endswith(".yml")]
    images = subprocess.run(["docker", "compose", *(f"--file={f}" for f in files), "config", "--images"], cwd=host,
                            env=steps.env, capture_output=True, text=True, timeout=60)
    assert set(images.stdout.split()) == {BUNDLE_TAG}, images.stdout + images.stderr  # the image loaded, not :latest
    ran = steps.run("air-gapped compose run", adapt(f"{export} && {one_run}", "airgap"), host)
    assert not re.search(r"\bbuild", ran.stdout + ran.stderr, re.I), (ran.stdout + ran.stderr)[-2000:]
    (folder,) = runlog.find(host / "runs")
    run = runlog.read(folder)
    assert run.exit_code == 0 and run.config["epochs"] == 1 and run.config["dataset"] == "fashion_mnist"
    assert (host / "outputs" / run.run_id / "model.onnx").is_file()
    assert shlex.split(one_run)[-1] == "--epochs=1"
