"""`python -m app launch`: N agent containers through the docker SDK, each pinned to its GPU by a device
request, logs streamed with a prefix, all stopped cleanly on Ctrl-C.

This engine has no NVIDIA runtime: the GPU pinning is checked on containers the engine creates from the
launcher's arguments (and the clear error when it cannot start them); the agents themselves run with --cpu.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env, error_lines, run_app, saved_checkpoint
from containers import TEST_IMAGE, app_image  # noqa: F401  (app_image: the session fixture)
from fake_wandb import FakeWandb
from sweep_project import fashion_project, write_env

from app import runlog
from app.container import launch

GRID = {
    "method": "grid",
    "parameters": {"learning_rate": {"values": [0.003, 0.01]}},
    "command": ["${env}", "${interpreter}", "-m", "app", "train", "${args}"],
}


def test_agents_go_round_robin_over_the_gpus():
    agents = launch.plan(4, ["0", "1"], {"SWEEP_ID": "e/p/s"})
    assert [(a.number, a.gpu) for a in agents] == [(1, "0"), (2, "1"), (3, "0"), (4, "1")]
    assert all(a.environment["NVIDIA_VISIBLE_DEVICES"] == a.gpu and a.environment["AGENTS_PER_GPU"] == "2" for a in agents)
    three = launch.plan(3, ["0", "1"], {})
    assert [(a.gpu, a.environment["AGENTS_PER_GPU"]) for a in three] == [("0", "2"), ("1", "1"), ("0", "2")]
    assert [a.gpu for a in launch.plan(2, None, {})] == [None, None]  # --cpu: no device requests
    uuid = "GPU-2f5a8f1e-0000-1111-2222-333344445555"
    assert launch.parse_gpus(f"0, 3,{uuid}") == ["0", "3", uuid]


def test_user_mistakes_are_one_line_and_exit_2(tmp_path: Path, env):
    good_env = tmp_path / "agents.env"
    good_env.write_text("SWEEP_ID=e/p/abc\nWANDB_API_KEY=" + "k" * 40 + "\n")
    (tmp_path / "nosweep.env").write_text("WANDB_MODE=online\n")
    no_engine = {**env, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    cases = [
        (["--gpus", "0"], env, "the following arguments are required: --agents"),
        (["--agents", "two"], env, "argument --agents: invalid int value: 'two'"),
        (["--agents", "0"], env, "--agents=0 must be at least 1"),
        (["--agents", "2", "--gpus", "0,gpu1"], env, "--gpus='0,gpu1': 'gpu1' is not a GPU index or UUID"),
        (["--agents", "2", "--gpus", "1,1"], env, "--gpus='1,1' names a GPU twice"),
        (["--agents", "2", "--gpus", "0", "--cpu"], env, "--cpu and --gpus exclude each other"),
        (["--agents", "2", "--cpu"], env, "--env-file '.env' not found: copy .env.example to .env"),
        (["--agents", "2", "--cpu", "--env-file", "nosweep.env"], env, "neither SWEEP_ID nor SWEEP_CONFIG is set in nosweep.env"),
        (["--agents", "2", "--cpu", "--env-file", "agents.env", "-e", "EPOCHS"], env, "-e 'EPOCHS' must be KEY=VALUE"),
        (["--agents", "2", "--cpu", "--env-file", "agents.env"], no_engine, "cannot reach the Docker engine"),
    ]
    for args, environ, message in cases:
        r = run_app(["launch", *args], environ, tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        (line,) = error_lines(r.stderr)
        assert message in line, (args, line)
        assert "Traceback" not in r.stderr


@pytest.mark.container
def test_each_agent_container_requests_its_own_gpu(app_image: str, tmp_path: Path, env):
    """The engine's own record of the containers the launcher asks for: one GPU each, compose's volumes."""
    import docker

    client = docker.from_env()
    project = tmp_path / "project"
    launcher = launch.Launcher(client, app_image, project, f"launch-test-{os.getpid()}", grace=60)
    created = []
    try:
        for agent in launch.plan(3, ["0", "1"], {"SWEEP_ID": "e/p/s"}):
            kwargs = launcher.container_kwargs(agent)
            kwargs.pop("detach")
            created.append(client.containers.create(**kwargs))
        hosts = [c.attrs["HostConfig"] for c in created]
        envs = [dict(e.split("=", 1) for e in c.attrs["Config"]["Env"]) for c in created]
    finally:
        for c in created:
            c.remove(force=True)
    assert [h["DeviceRequests"][0]["DeviceIDs"] for h in hosts] == [["0"], ["1"], ["0"]]
    assert all(h["DeviceRequests"][0]["Capabilities"] == [["gpu"]] and len(h["DeviceRequests"]) == 1 for h in hosts)
    assert [(e["NVIDIA_VISIBLE_DEVICES"], e["AGENTS_PER_GPU"]) for e in envs] == [("0", "2"), ("1", "1"), ("0", "2")]
    binds = sorted(hosts[0]["Binds"])
    assert binds == sorted(f"{(project / n).resolve()}:/{n}:rw" for n in ("data", "runs", "outputs"))
    assert created[0].attrs["Config"]["User"] == f"{os.getuid()}:{os.getgid()}"
    # and started for real on this engine (no NVIDIA runtime): one line, exit 2, nothing left behind
    (tmp_path / "agents.env").write_text("SWEEP_ID=e/p/abc\nWANDB_API_KEY=" + "k" * 40 + "\n")
    name = f"launch-gpu-{os.getpid()}"
    r = run_app(["launch", "--agents", "2", "--gpus", "0,1", "--image", app_image, "--env-file", "agents.env",
                 "--project-dir", str(project), "--name", name], env, tmp_path)
    assert r.returncode == 2
    (line,) = error_lines(r.stderr)
    assert f"{name}-1 could not get GPU 0" in line and "NVIDIA container runtime" in line
    assert client.containers.list(all=True, filters={"label": f"{launch.LABEL}={name}"}) == []


def run_launch(project: Path, name: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """The launcher as a user starts it; its output goes to a file (a pipe nobody reads would block it)."""
    args = [sys.executable, "-m", "app", "launch", "--agents", "2", "--cpu", "--image", TEST_IMAGE,
            "--env-file", str(project / ".env"), "--project-dir", str(project), "--network", "host", "--name", name]
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)



def leftover_agents(name: str) -> list:
    import docker

    return docker.from_env().containers.list(all=True, filters={"label": f"{launch.LABEL}={name}"})


def finish(proc: subprocess.Popen, name: str) -> list:
    """The launcher's containers still there after it ended (none, when it cleaned up); then removes
    them anyway, so a failed test leaves no agent training in the background."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    left = leftover_agents(name)
    for c in left:
        c.remove(force=True)
    return left


def launch_to_the_end(project: Path, name: str, env: dict[str, str], log: Path, timeout: float) -> tuple[int, list, str]:
    """Run the launcher until it exits: (its exit code, containers it left behind, its output)."""
    proc = run_launch(project, name, env, log)
    try:
        proc.wait(timeout=timeout)
    finally:
        left = finish(proc, name)
    return proc.returncode, left, log.read_text()


@pytest.mark.container
@pytest.mark.slow
def test_ctrl_c_stops_every_agent_and_a_relaunch_finishes_the_sweep(app_image: str, tmp_path: Path):
    project = fashion_project(tmp_path / "project")
    name = f"launch-test-{os.getpid()}"
    env = clean_env(tmp_path)
    with FakeWandb(GRID) as api:
        api.hold_open = True
        write_env(project, api, EPOCHS="2", TRAIN_STRIDE="5")
        log1 = tmp_path / "launch-1.log"
        proc = run_launch(project, name, env, log1)
        try:
            # both agents train; once both have finished epoch 1, Ctrl-C the launcher
            deadline = time.monotonic() + 600
            while not (len(api.assignments) == 2 and all(
                    (saved_checkpoint(project / "outputs" / a.run_id / "checkpoint.pt") or {}).get("epoch") == 1 for a in api.assignments)):
                text = log1.read_text()
                failed = proc.poll() is not None or "| error: " in text or time.monotonic() > deadline
                assert not failed, text[-4000:]  # a run that failed will never reach epoch 2: stop waiting
                time.sleep(0.3)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
            stop_s = time.monotonic() - t0
        finally:
            left = finish(proc, name)
        out = log1.read_text()
        assert proc.returncode == 128 + signal.SIGINT, out[-4000:]
        assert "launch | SIGINT: stopping 2 agent(s)" in out
        assert left == []  # the launcher removed its stopped containers
        runs = [runlog.read(f) for f in runlog.find(project / "runs")]
        assert sorted(r.run_id for r in runs) == sorted(a.run_id for a in api.assignments)
        assert all(r.preempting and r.exit_code == 143 for r in runs), [(r.run_id, r.exit_code) for r in runs]

        # relaunch: W&B hands the preempted runs out again; they resume and the launcher ends with the sweep
        for a in list(api.assignments):
            api.requeue(a.run_id)
        api.hold_open = False
        code, left, out2 = launch_to_the_end(project, name, env, tmp_path / "launch-2.log", timeout=900)
    assert code == 0, out2[-4000:]
    assert left == []
    lines = out2.splitlines()
    for number in (1, 2):
        prefix = f"agent-{number} | "
        assert any(ln.startswith(prefix + "started ") for ln in lines)
        assert any(ln.startswith(prefix) and "resuming run" in ln and "1 epoch(s) done" in ln for ln in lines), out2[-4000:]
        assert any(ln.startswith(prefix + "exited with code 0") for ln in lines)
    assert lines[-1] == "launch | all 2 agent(s) finished"
    finals = [runlog.read(f) for f in runlog.find(project / "runs")]
    done = [r for r in finals if r.exit_code == 0 and "test_accuracy" in r.summary]
    assert sorted(r.run_id for r in done) == sorted({a.run_id for a in api.assignments})
    print(f"\nlaunch: Ctrl-C stopped 2 agents in {stop_s:.1f}s; relaunch resumed and finished both runs")


OFFLINE_GRID = """name: launch-grid
method: grid
metric: {name: val_accuracy, goal: maximize}
parameters:
  learning_rate: {values: [0.003, 0.01, 0.03]}
"""


@pytest.mark.container
@pytest.mark.slow
def test_launch_serves_an_offline_sweep(app_image: str, tmp_path: Path):
    """SWEEP_CONFIG instead of SWEEP_ID (the air-gapped case): the same launcher starts offline-sweep agents,
    coordinated through the journal on the shared ./runs; every grid point trains exactly once."""
    project = fashion_project(tmp_path / "project")
    (project / "runs" / "grid.yaml").write_text(OFFLINE_GRID)  # /runs/grid.yaml in the containers
    (project / ".env").write_text("SWEEP_CONFIG=/runs/grid.yaml\nWANDB_MODE=offline\nDATASET=fashion_mnist\n"
                                  "EPOCHS=1\nTRAIN_STRIDE=50\nVAL_SIZE=1000\nWATCH_LOG=none\nOMP_NUM_THREADS=1\n")
    name = f"launch-offline-{os.getpid()}"
    code, left, out = launch_to_the_end(project, name, clean_env(tmp_path), tmp_path / "launch.log", timeout=600)
    assert code == 0, out[-4000:]
    assert left == []
    for number in (1, 2):
        assert f"agent-{number} | exited with code 0" in out
    assert "sweep launch-grid: grid" in out and "SWEEP_ID" not in out
    runs = [runlog.read(f) for f in runlog.find(project / "runs")]
    done = sorted(r.config["learning_rate"] for r in runs if r.exit_code == 0 and r.group == "launch-grid")
    assert done == [0.003, 0.01, 0.03], out[-4000:]
