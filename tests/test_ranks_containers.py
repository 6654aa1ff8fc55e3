"""GPUS_PER_TRIAL=2 in the image with compose: an offline sweep's agent container trains each trial as 2
gloo ranks on the CPU (docker-compose.cpu.yml), rank 0 recording every trial's run once; the sweep's
`kernels` values reach rank 1 (DDP refuses ranks whose models differ)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FASHION_MNIST
from containers import app_image, compose, docker, give_to_container, project_dir  # noqa: F401
from optuna.trial import TrialState

from app import data, runlog
from app.sweep.optuna import storage as sweep_storage

pytestmark = [pytest.mark.container, pytest.mark.slow]

SWEEP = "ranks-compose"
KERNELS = [[4, 8], [6, 12], [8, 16]]


def test_an_agent_container_trains_each_trial_on_two_ranks(tmp_path: Path, app_image):  # noqa: F811
    project = project_dir(tmp_path)
    raw = project / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in sorted(FASHION_MNIST.glob("*-ubyte.gz")):
        (raw / f.name).write_bytes(f.read_bytes())
    data.ensure("fashion_mnist", project / "data")
    give_to_container(project / "data")
    (project / "runs" / "ranks.yaml").write_text(  # the runs volume: /runs/ranks.yaml in the container
        f"name: {SWEEP}\nmethod: grid\nmetric: {{name: val_accuracy, goal: maximize}}\n"
        f"parameters:\n  kernels: {{values: {KERNELS}}}\n")
    give_to_container(project / "runs")
    (project / ".env").write_text("\n".join([
        "WANDB_MODE=offline", "SWEEP_CONFIG=/runs/ranks.yaml", "GPUS_PER_TRIAL=2", "SWEEP_HEARTBEAT_S=2",
        "DATASET=fashion_mnist", "EPOCHS=1", "TRAIN_STRIDE=50", "VAL_SIZE=1000", "BATCH_SIZE=64", "LOG_INTERVAL=3",
        "WATCH_LOG=none", "OMP_NUM_THREADS=1", "WANDB_SILENT=true", ""]))
    try:
        up = compose("up", "--detach", "agent", project=project)
        assert up.returncode == 0, up.stderr
        ids = compose("ps", "--all", "--quiet", "agent", project=project).stdout.split()
        assert len(ids) == 1
        waited = docker("wait", *ids, timeout=900)
        logs = compose("logs", "--no-color", "agent", project=project).stdout[-12000:]
        assert waited.returncode == 0 and waited.stdout.split() == ["0"], logs
        study = sweep_storage.load_study(str(project / "runs" / "sweeps" / f"{SWEEP}.journal"), SWEEP)
        trials = study.get_trials(deepcopy=False)
        assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials), logs
        runs = {r.run_id: r for r in (runlog.read(f) for f in runlog.find(project / "runs"))}
        assert len(runs) == 3, logs  # one record per trial: rank 1 writes none
        for t in trials:
            run = runs[t.user_attrs["run_id"]]
            assert run.exit_code == 0 and run.config["kernels"] == t.user_attrs["values"]["kernels"]
            assert (project / "outputs" / run.run_id / "model.onnx").is_file()
    finally:
        compose("down", "--timeout", "5", project=project)
