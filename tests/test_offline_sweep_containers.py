"""End to end: the repository's sweeps/grid.yaml as an offline sweep in 3 `agent` containers
(`docker compose up agent --scale agent=3` with SWEEP_CONFIG and WANDB_MODE=offline, no W&B server).

One container is killed with SIGKILL in the middle of a trial and started again (`up` once more): the
trial it held is failed by another agent and rerun, every grid point completes exactly once, and every
trial is an offline W&B run in the host's runs folder, grouped under the sweep's name.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
from conftest import FASHION_MNIST, wait_for
from containers import app_image, compose, docker, give_to_container, project_dir  # noqa: F401
from optuna.trial import TrialState

from app import data, runlog
from app.sweep.optuna import storage as sweep_storage

pytestmark = [pytest.mark.container, pytest.mark.slow]

SWEEP = "mnist-grid"  # name: in sweeps/grid.yaml
GRID_SIZE = 6


def sweep_project(base: Path) -> Path:
    project = project_dir(base)
    raw = project / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in sorted(FASHION_MNIST.glob("*-ubyte.gz")):
        shutil.copyfile(f, raw / f.name)
    data.ensure("fashion_mnist", project / "data")  # unpacked once here: three agents unpacking at once would race
    give_to_container(project / "data")
    (project / ".env").write_text("\n".join([
        "WANDB_MODE=offline", "SWEEP_CONFIG=/app/sweeps/grid.yaml", "SWEEP_HEARTBEAT_S=2",
        "DATASET=fashion_mnist", "EPOCHS=2", "TRAIN_STRIDE=50", "VAL_SIZE=1000", "LOG_INTERVAL=3",
        "WATCH_LOG=none", "OMP_NUM_THREADS=1", "WANDB_SILENT=true", ""]))
    return project


def agent_containers(project: Path) -> list[str]:
    proc = compose("ps", "--all", "--quiet", "agent", project=project)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def container_logs(project: Path) -> str:
    return compose("logs", "--no-color", "agent", project=project).stdout[-12000:]


def study_of(project: Path):
    journal = project / "runs" / "sweeps" / f"{SWEEP}.journal"
    return sweep_storage.load_study(str(journal), SWEEP)  # read-only, as sweep-status reads it


def test_three_agent_containers_run_the_grid_once_through_a_kill(tmp_path, app_image):  # noqa: F811
    project = sweep_project(tmp_path)
    try:
        up = compose("up", "--detach", "--scale", "agent=3", "agent", project=project)
        assert up.returncode == 0, up.stderr
        journal = project / "runs" / "sweeps" / f"{SWEEP}.journal"
        # the journal file appears a moment before the study is written into it
        wait_for(lambda: journal.exists() and b'"study_name"' in journal.read_bytes(), 180,
                 "the sweep's study in its journal", lambda: container_logs(project))

        def mid_trial():
            for t in study_of(project).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                run_id = t.user_attrs.get("run_id")
                if run_id and (project / "outputs" / run_id / "checkpoint.pt").exists():
                    return t
            return None

        victim_trial = wait_for(mid_trial, 300, "a trial past its first epoch", lambda: container_logs(project))
        container = victim_trial.user_attrs["agent"].split(":")[0]  # the container's hostname is its id
        killed = docker("kill", "--signal", "KILL", container)
        assert killed.returncode == 0, killed.stderr
        killed_at = time.time()
        # restart: `up` again starts the killed replica; it joins the same sweep
        again = compose("up", "--detach", "--scale", "agent=3", "agent", project=project)
        assert again.returncode == 0, again.stderr

        ids = agent_containers(project)
        assert len(ids) == 3
        waited = docker("wait", *ids, timeout=900)
        assert waited.returncode == 0, waited.stderr + container_logs(project)
        codes = [int(c) for c in waited.stdout.split()]
        assert codes == [0, 0, 0], container_logs(project)

        study = study_of(project)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        keys = sorted(t.system_attrs["sweep_key"] for t in complete)
        assert keys == sorted(f"grid-{i}" for i in range(GRID_SIZE)), container_logs(project)  # each point once
        dead = trials[victim_trial.number]
        assert dead.state == TrialState.FAIL and dead.system_attrs["sweep_outcome"] == "stale"
        retry = [t for t in trials if t.system_attrs.get("retry_of") == dead.number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
        assert retry[0].params == dead.params

        runs = {r.run_id: r for r in (runlog.read(f) for f in runlog.find(project / "runs"))}
        assert sum(r.finished for r in runs.values()) == GRID_SIZE
        for t in complete:
            run = runs[t.user_attrs["run_id"]]
            assert run.group == SWEEP and run.exit_code == 0
            assert {k: run.config[k] for k in ("learning_rate", "batch_size")} == t.user_attrs["values"]
            assert math.isclose(run.summary["val_accuracy"], t.value)
            assert not [p for p in run.path.rglob("*") if p.is_symlink()]  # no links into container paths
        duplicates = [t for t in trials if t.system_attrs.get("sweep_outcome") == "duplicate"]
        print(json.dumps({"trials": len(trials), "complete": len(complete), "duplicates": len(duplicates),
                          "retry_started_s": round(retry[0].datetime_start.timestamp() - killed_at, 1),
                          "recovered_s": round(retry[0].datetime_complete.timestamp() - killed_at, 1)}))
    finally:
        compose("down", "--timeout", "5", project=project)
