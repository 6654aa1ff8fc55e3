"""Fault matrix through `docker run` of the image: environment values a user gets wrong are one line and
exit 2 before anything starts, in every entrypoint mode; agents sharing a runs volume never refuse
each other's folder; an agent container's exit code tells a `docker stop` (143) from a finished sweep (0).

    CI=true pytest -q tests/test_faults_container.py       (needs the Docker engine; builds the test image)
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from containers import TEST_IMAGE, app_image, docker, give_to_container  # noqa: F401  (session fixture)
from fake_wandb import FakeWandb
from sweep_project import fashion_project

from app import runlog

pytestmark = pytest.mark.container

KEY = "k" * 40
AGENT = {"SWEEP_ID": "ent/proj/sweep1", "WANDB_API_KEY": KEY, "ALLOW_CPU": "true"}
TINY = {"DATASET": "fashion_mnist", "EPOCHS": "1", "TRAIN_STRIDE": "50", "VAL_SIZE": "1000", "WATCH_LOG": "none"}


def volumes(project: Path) -> list[str]:
    return [f"--volume={project / name}:/{name}" for name in ("data", "runs", "outputs")]


def run_image(project: Path, env: dict[str, str], *args: str, flags: tuple[str, ...] = (),
              timeout: float = 300):
    env_flags = [f"--env={k}={v}" for k, v in env.items()]
    return docker("run", "--rm", "--user=1000:1000", *flags, *volumes(project), *env_flags, TEST_IMAGE, *args,
                  timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return fashion_project(tmp_path_factory.mktemp("faults") / "project")


CASES = {
    "agent-epochs-many": ({**AGENT, "EPOCHS": "many"}, "epochs='many' (from environment) is not an integer"),
    "agent-lr-inf": ({**AGENT, **TINY, "LEARNING_RATE": "inf"}, "learning_rate=inf must be > 0 and finite"),
    "agent-classes-vs-data": ({**AGENT, **TINY, "CLASSES": "3"}, "classes=3 but"),
    "agent-offline-mode": ({**AGENT, "WANDB_MODE": "offline"}, "cannot run offline"),
    "agent-count-zero": ({**AGENT, "AGENT_COUNT": "0"}, "AGENT_COUNT='0' must be a positive integer"),
    "run-empty-mode-lr-inf": ({"ALLOW_CPU": "true", "WANDB_MODE": "", **TINY, "LEARNING_RATE": "inf"},
                              "learning_rate=inf must be > 0 and finite"),
    "run-val-size-vs-data": ({"ALLOW_CPU": "true", **TINY, "VAL_SIZE": "70000"}, "val_size=70000 must be at most"),
    "run-allow-cpu-odd": ({"ALLOW_CPU": "maybe"}, "ALLOW_CPU='maybe' must be true or false"),
    "offline-sweep-folder": ({"SWEEP_CONFIG": "/app", "ALLOW_CPU": "true"}, "is a folder"),
    "offline-sweep-binary": ({"SWEEP_CONFIG": "/bin/sh", "ALLOW_CPU": "true"}, "is not a text file"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_env_faults_are_one_line_before_any_work(app_image, project: Path, case: str):
    environ, fragment = CASES[case]
    proc = run_image(project, environ)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "starting: " not in proc.stdout
    assert not list((project / "runs").glob("wandb/*run-*")), "a W&B run was left for a refused setting"


def test_empty_wandb_mode_runs_and_the_hint_names_the_host(app_image, tmp_path: Path):
    """WANDB_MODE= (as an empty .env line gives it) is unset: offline without a key. The end-of-run hint
    names what to run on the host, not a path that exists only inside the container."""
    project = fashion_project(tmp_path / "project")
    proc = run_image(project, {"ALLOW_CPU": "true", "WANDB_MODE": "", "EPOCHS": "", **{**TINY, "EPOCHS": ""}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "upload it on the host with: python -m app sync runs" in proc.stderr, proc.stderr[-2000:]
    assert "wandb sync /runs" not in proc.stdout + proc.stderr
    (folder,) = runlog.find(project / "runs")
    assert runlog.read(folder).exit_code == 0


PROBE = """
import sys, threading
from pathlib import Path
from app import tracking
from app.errors import UserError
failed = []
def probe():
    for _ in range(300):
        try:
            tracking.check_writable(Path("/runs/shared"), "WANDB_DIR")
        except UserError as exc:
            failed.append(str(exc))
threads = [threading.Thread(target=probe) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(failed), failed[:1])
sys.exit(1 if failed else 0)
"""


def test_containers_on_one_volume_probe_it_at_once_without_a_false_refusal(app_image, tmp_path: Path):
    # every container numbers its processes from 1: a probe named by pid is the same file in all of them
    runs = tmp_path / "runs"
    (runs / "shared").mkdir(parents=True)
    give_to_container(runs)

    def one(_):
        return docker("run", "--rm", "--user=1000:1000", f"--volume={runs}:/runs", TEST_IMAGE, "python", "-c", PROBE,
                      timeout=300)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    for proc in results:
        assert proc.returncode == 0 and proc.stdout.startswith("0 "), proc.stdout + proc.stderr[-2000:]
    assert not list((runs / "shared").iterdir())  # no probe left behind


SWEEP = {
    "method": "grid",
    "metric": {"name": "val_accuracy", "goal": "maximize"},
    "parameters": {"learning_rate": {"values": [0.003]}},
    "command": ["${env}", "${interpreter}", "-m", "app", "train", "${args}"],
}


def _agent_env(api: FakeWandb, **extra: str) -> dict[str, str]:
    return {"SWEEP_ID": api.sweep_path, "WANDB_BASE_URL": api.url, "WANDB_API_KEY": KEY, "AGENT_RUN_MODE": "offline",
            "ALLOW_CPU": "true", **TINY, **extra}


def test_agent_exits_0_when_the_sweep_is_done(app_image, tmp_path: Path):
    project = fashion_project(tmp_path / "project")
    with FakeWandb(SWEEP) as api:
        proc = run_image(project, _agent_env(api), flags=("--network=host",), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Ignoring project" not in proc.stdout + proc.stderr  # a sweep run passes no project / id of its own
    (folder,) = runlog.find(project / "runs")
    assert runlog.read(folder).exit_code == 0


def test_docker_stop_of_an_agent_exits_143(app_image, tmp_path: Path):
    project = fashion_project(tmp_path / "project")
    name = f"mnist-sweeps-agent-stop-{tmp_path.name[-12:]}"
    with FakeWandb(SWEEP) as api:
        env = _agent_env(api, EPOCHS="20", TRAIN_STRIDE="1")  # long enough to be stopped mid-run
        flags = [f"--env={k}={v}" for k, v in env.items()]
        started = docker("run", "--detach", f"--name={name}", "--network=host", "--user=1000:1000",
                         *volumes(project), *flags, TEST_IMAGE)
        assert started.returncode == 0, started.stderr
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not list((project / "runs").glob("wandb/offline-run-*")):
                time.sleep(0.5)
            time.sleep(3)
            assert docker("stop", "--time=60", name, timeout=120).returncode == 0
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            logs = docker("logs", name)
        finally:
            docker("rm", "--force", name)
    assert state["ExitCode"] == 143, (state, logs.stdout[-2000:], logs.stderr[-3000:])
    assert "agent stopped by SIGTERM" in logs.stderr and "Traceback" not in logs.stderr, logs.stderr[-3000:]
    (folder,) = runlog.find(project / "runs")
    assert runlog.read(folder).exit_code == 143  # the run itself was preempted, with its exit record
