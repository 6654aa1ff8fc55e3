"""The image and its compose file on the real Docker engine: a CPU run through `docker compose run train`,
the entrypoint's checks, `docker stop` mid-training, and what the image must not hold."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from containers import TEST_IMAGE, app_image, compose, docker, give_to_container  # noqa: F401  (session fixture)
from sweep_project import fashion_project

from app import runlog

pytestmark = pytest.mark.container

CANARY = "canary-" + "f" * 33  # a 40-character string shaped like a W&B API key
TINY = {"DATASET": "fashion_mnist", "EPOCHS": "1", "TRAIN_STRIDE": "50", "VAL_SIZE": "1000"}


def volumes(project: Path) -> list[str]:
    return [f"--volume={project / name}:/{name}" for name in ("data", "runs", "outputs")]


def run_image(project: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`docker run` of the image under test as the compose file would (user, volumes), without compose."""
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    return docker("run", "--rm", "--user=1000:1000", *volumes(project), *flags, TEST_IMAGE, *args, timeout=timeout)


def test_compose_train_on_cpu_records_a_real_offline_run_in_the_host_volume(app_image, tmp_path: Path):
    project = fashion_project(tmp_path / "project")
    # settings come from the project's .env, as a user writes it; the key must never reach a log line
    # or the run's record, even when given (offline: it is not needed)
    settings = {**TINY, "WANDB_MODE": "offline", "WANDB_API_KEY": CANARY}
    (project / ".env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    proc = compose("run", "--rm", "train", "--learning_rate=0.003", project=project, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert CANARY not in proc.stdout + proc.stderr
    # the end-of-run hint names the host's runs folder (compose's default ./runs), not /runs inside
    assert "upload it on the host with: python -m app sync ./runs" in proc.stdout + proc.stderr, proc.stderr[-2000:]

    (folder,) = runlog.find(project / "runs")
    run = runlog.read(folder)
    assert run.exit_code == 0
    assert run.config["learning_rate"] == 0.003 and run.config["dataset"] == "fashion_mnist"
    assert run.config["data_dir"] == "/data" and run.config["output_dir"] == "/outputs"
    # 240 training images, one epoch: well above chance (0.1), as a real model on real data
    assert 0.3 < run.summary["test_accuracy"] <= 1.0
    assert run.metric("val_accuracy"), "the per-epoch held-out metric was not logged"
    assert CANARY.encode() not in b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())

    # the files belong to the container user (the host user under compose) and others can read them
    onnx = project / "outputs" / run.run_id / "model.onnx"
    for path in (folder / f"run-{run.run_id}.wandb", folder / "files" / "model.onnx", onnx):
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode), f"{path} is not a regular file"
        assert st.st_uid == 1000 or st.st_uid == os.getuid()
        assert st.st_mode & stat.S_IROTH, f"{path} is not readable by other users"
    assert (project / "outputs" / run.run_id / "checkpoint.pt").is_file()


@pytest.mark.parametrize("env, args, message", [
    ({"WANDB_MODE": "sometimes"}, [], "WANDB_MODE='sometimes' must be one of"),
    ({"WANDB_MODE": "online"}, [], "WANDB_MODE=online needs an API key"),
    ({"SWEEP_ID": "team/proj/abc123", "WANDB_MODE": "offline", "WANDB_API_KEY": CANARY}, [], "cannot run offline"),
    ({"SWEEP_ID": "team/proj/abc123"}, [], "no W&B API key"),
    ({"APP_MODE": "sideways"}, [], "APP_MODE='sideways' must be one of"),
    ({"EPOCHS": "many"}, [], "epochs='many'"),
    ({}, ["--epochs=0"], "epochs=0 must be >= 1"),
    ({"ALLOW_CPU": ""}, [], "no GPU is visible in the container"),
])
def test_entrypoint_rejects_a_bad_environment_in_one_line(app_image, tmp_path: Path, env, args, message):
    project = fashion_project(tmp_path / "project")
    env = {"ALLOW_CPU": "true", **env}
    proc = run_image(project, *args, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], proc.stderr
    assert CANARY not in proc.stdout + proc.stderr
    assert not list((project / "runs").iterdir()), "a run was started before the check"


def test_an_unwritable_runs_volume_is_refused_before_any_work(app_image, tmp_path: Path):
    project = fashion_project(tmp_path / "project")
    give_to_container(project / "runs").chmod(0o555)  # owned by the container's user, but read-only
    proc = run_image(project, env={"ALLOW_CPU": "true"}, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: WANDB_DIR='/runs' is not writable")


def test_docker_stop_checkpoints_within_the_grace_period(app_image, tmp_path: Path):
    project = fashion_project(tmp_path / "project")
    name = f"mnist-sweeps-stop-{os.getpid()}"
    settings = {**TINY, "TRAIN_STRIDE": "1", "EPOCHS": "3", "ALLOW_CPU": "true", "WANDB_MODE": "offline",
                "WANDB_RUN_ID": "stopme01"}
    flags = [f"--env={k}={v}" for k, v in settings.items()]
    started = docker("run", "--detach", f"--name={name}", "--user=1000:1000", *volumes(project), *flags, TEST_IMAGE)
    assert started.returncode == 0, started.stderr
    try:
        # wait until steps are being taken, however slow start-up is on a busy host: a progress line
        # of epoch 1 (printed after 10 s of training) or its end; either leaves at least one whole epoch
        # of 60 000 images (10-30 s here) to be stopped in
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            logs = docker("logs", name)
            if re.search(r"^epoch 1/3 (examples|done)", logs.stdout + logs.stderr, flags=re.M):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"training never started:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
        t0 = time.monotonic()
        stop = docker("stop", "--time=60", name, timeout=120)
        took = time.monotonic() - t0
        assert stop.returncode == 0
        assert took < 30, f"docker stop took {took:.1f} s: the signal did not reach training"
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 143, state  # 128 + SIGTERM: preempted, not a clean finish
        logs = docker("logs", name)
    finally:
        docker("rm", "--force", name)
    ckpt = project / "outputs" / "stopme01" / "checkpoint.pt"
    assert ckpt.is_file(), logs.stdout[-2000:] + logs.stderr[-2000:]
    (folder,) = runlog.find(project / "runs")
    run = runlog.read(folder)
    assert run.preempting and run.exit_code == 143


def test_the_image_runs_as_non_root_and_holds_no_secret(app_image, tmp_path: Path):
    who = docker("run", "--rm", TEST_IMAGE, "id", "-u")
    assert who.returncode == 0 and who.stdout.strip() == "1000"
    found = docker("run", "--rm", "--user=0", TEST_IMAGE, "sh", "-c",
                   "find / -xdev \\( -name .env -o -name .netrc \\) 2>/dev/null; true")
    assert found.stdout.strip() == "", f"secret-looking files in the image: {found.stdout}"
    config = json.loads(docker("image", "inspect", TEST_IMAGE).stdout)[0]["Config"]
    assert not [e for e in config["Env"] if e.split("=", 1)[0] in ("WANDB_API_KEY", "PIP_INDEX_URL", "PIP_FIND_LINKS")]
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", TEST_IMAGE).stdout
    assert "WANDB_API_KEY=" not in history and "127.0.0.1" not in history
    # the entrypoint: an init as PID 1 that forwards signals, then our program
    assert config["Entrypoint"][0] == "dumb-init"


README_GRID = {
    "method": "grid",
    "metric": {"name": "val_accuracy", "goal": "maximize"},
    "parameters": {"learning_rate": {"values": [0.003, 0.01]}, "batch_size": {"values": [64, 128]}},
    "command": ["${env}", "${interpreter}", "-m", "app", "train", "${args}"],
}


def test_readme_sweep_flow_from_a_copy_of_the_shipped_env_example(app_image, tmp_path: Path):
    """README's sweep flow as written: `cp .env.example .env`, add SWEEP_ID (and a key), then
    `docker compose up agent --scale agent=4`. Every agent starts and every grid point trains once."""
    from collections import Counter

    from conftest import REPO
    from fake_wandb import FakeWandb
    from sweep_project import agent_logs, compose_files, joined

    project = fashion_project(tmp_path / "project")
    with FakeWandb(README_GRID) as api:
        # the user's edits (README): the sweep id `sweep create` printed and an API key; the test host's:
        # the stand-in's URL, Fashion-MNIST (MNIST can't be downloaded here), a tiny run, runs kept on disk
        edits = {"SWEEP_ID": api.sweep_path, "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": api.url,
                 "DATASET": "fashion_mnist", "EPOCHS": "1", "TRAIN_STRIDE": "50", "VAL_SIZE": "1000",
                 "WATCH_LOG": "none", "AGENT_RUN_MODE": "offline"}
        lines = []
        for line in (REPO / ".env.example").read_text().splitlines():
            key = line.lstrip("# ").split("=", 1)[0]
            lines.append(f"{key}={edits.pop(key)}" if key in edits and "=" in line else line)
        (project / ".env").write_text("\n".join([*lines, *(f"{k}={v}" for k, v in edits.items())]) + "\n")
        try:
            up = compose("up", "--scale", "agent=4", "agent", project=project, files=compose_files, timeout=900)
            logs = joined(agent_logs(project))
        finally:
            compose("down", "--remove-orphans", project=project, files=compose_files, timeout=120)
    assert up.returncode == 0, (up.stdout + up.stderr)[-4000:] + logs[-4000:]
    assert "error:" not in logs and "Traceback" not in logs, logs[-4000:]
    assert "Ignoring project" not in logs  # sweep runs leave project and id to the agent
    trained = [runlog.read(f) for f in runlog.find(project / "runs")]
    trained = [r for r in trained if r.exit_code == 0 and "test_accuracy" in r.summary]
    points = Counter((r.config["learning_rate"], r.config["batch_size"]) for r in trained)
    assert set(points) == {(lr, bs) for lr in (0.003, 0.01) for bs in (64, 128)}, (points, logs[-4000:])
    assert set(points.values()) == {1}
