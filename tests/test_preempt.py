"""The signal path through the unmodified `wandb agent` in an `agent` container: `docker compose stop`
mid-run -> the run checkpoints, is marked preempting and exits non-zero; the run handed out again under
the same id (the stand-in does what W&B does with a preempted run: a "resume" command to the next agent)
-> it resumes from its checkpoint and completes. And, without containers: a run stopped mid-epoch and
resumed trains exactly what the same run uninterrupted trains, and its step axis ends at the same step.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import clean_env, run_app, saved_checkpoint, wait_for
from containers import app_image, compose  # noqa: F401  (app_image: the session fixture)
from idx import write_dataset
from fake_wandb import FakeWandb
from sweep_project import agent_logs, compose_files, fashion_project, joined, write_env

from app import runlog

ONE_POINT = {
    "method": "grid",
    "parameters": {"learning_rate": {"values": [0.003]}},
    "command": ["${env}", "${interpreter}", "-m", "app", "train", "${args}"],
}
EPOCHS = 2
GRACE_S = 60  # docker-compose.yml's stop_grace_period




@pytest.mark.container
@pytest.mark.slow
def test_stop_checkpoints_and_the_requeued_run_resumes(app_image: str, tmp_path: Path):
    project = fashion_project(tmp_path / "project")
    with FakeWandb(ONE_POINT) as api:
        api.hold_open = True  # the agent waits for the requeue instead of being told the sweep is done
        # every 5th training image: epochs long enough to stop one in the middle
        write_env(project, api, EPOCHS=str(EPOCHS), TRAIN_STRIDE="5")
        try:
            # --- run, and stop the agent in the middle of the last epoch ---
            up = compose("up", "--detach", "agent", project=project, files=compose_files, timeout=300)
            assert up.returncode == 0, up.stderr[-3000:]
            (first,) = wait_for(lambda: api.assignments, 300, "the agent to get its run")
            run_id = first.run_id
            ckpt_path = project / "outputs" / run_id / "checkpoint.pt"
            # epoch 1's checkpoint is written the moment epoch 2 starts
            wait_for(lambda: (saved_checkpoint(ckpt_path) or {}).get("epoch") == 1, 600, "the first epoch's checkpoint")
            after_epoch_1 = saved_checkpoint(ckpt_path)["examples_seen"]
            t0 = time.monotonic()
            stop = compose("stop", "agent", project=project, files=compose_files, timeout=GRACE_S + 60)
            stop_s = time.monotonic() - t0
            assert stop.returncode == 0, stop.stderr[-3000:]
            stopped_logs = joined(agent_logs(project))

            # the run stopped inside epoch 2: checkpointed there, preempting, a non-zero exit
            assert stop_s < GRACE_S, f"took {stop_s:.0f}s: the grace period ran out (SIGKILL)"
            (folder,) = runlog.find(project / "runs")
            stopped = runlog.read(folder)
            assert stopped.run_id == run_id and stopped.preempting, stopped_logs[-4000:]
            assert stopped.exit_code == 143, stopped_logs[-4000:]  # 128 + SIGTERM: W&B requeues it
            assert f"done: run {run_id}" not in stopped_logs
            saved = saved_checkpoint(ckpt_path)
            assert saved["epoch"] == 1 and saved["examples_seen"] > after_epoch_1  # progress inside epoch 2 kept
            claim = json.loads(next((project / "runs" / ".sweep-claims").glob("*/*.json")).read_text())
            assert (claim["run_id"], claim["state"]) == (run_id, "preempted")

            # --- the requeued run, same id: resumes from the checkpoint and completes ---
            api.requeue(run_id)
            api.hold_open = False
            again = compose("up", "agent", project=project, files=compose_files, timeout=900)
            logs = joined(agent_logs(project))
        finally:
            compose("down", "--remove-orphans", project=project, files=compose_files, timeout=120)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert [a.command for a in api.assignments] == ["run", "resume"]
    assert f"resuming run {run_id} from /outputs/{run_id}/checkpoint.pt: 1 epoch(s) done" in logs, logs[-4000:]
    assert f"done: run {run_id}" in logs
    resumed = [runlog.read(f) for f in runlog.find(project / "runs") if f != folder]
    (final,) = resumed
    assert final.run_id == run_id and final.exit_code == 0 and not final.preempting
    assert 0.5 < final.summary["test_accuracy"] <= 1.0
    # nothing was lost or redone: epoch 0 was validated before the stop, epoch 1 went on from the stop
    assert [row["epoch"] for row in stopped.history if "val_loss" in row] == [0]
    assert [row["epoch"] for row in final.history if "val_loss" in row] == [1]
    assert saved_checkpoint(ckpt_path)["epoch"] == EPOCHS
    claim = json.loads(next((project / "runs" / ".sweep-claims").glob("*/*.json")).read_text())
    assert (claim["run_id"], claim["state"]) == (run_id, "finished")
    print(f"\npreempt: stop took {stop_s:.1f}s; resumed from epoch 1 with {saved['examples_seen']} examples seen")


def _loss_steps(folder: Path) -> list[int]:
    return [step for step, _ in runlog.read(folder).metric("loss")]


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_ends_where_the_uninterrupted_run_ends(tmp_path: Path):
    data_dir = tmp_path / "data"
    write_dataset(data_dir, "mnist", n_train=2200, n_test=200)
    settings = dict(DATA_DIR=str(data_dir), EPOCHS="2", TRAIN_STRIDE="1", VAL_SIZE="200", LOG_INTERVAL="5",
                    BATCH_SIZE="32", DEVICE="cpu", WANDB_MODE="offline")

    def env(run_id: str) -> dict[str, str]:
        return clean_env(tmp_path, **settings, WANDB_DIR=str(tmp_path / run_id / "runs"),
                         OUTPUT_DIR=str(tmp_path / "outputs"), WANDB_RUN_ID=run_id)

    straight = run_app(["train"], env("straight"), tmp_path, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    ckpt_path = tmp_path / "outputs" / "stopped" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "app", "train"], env=env("stopped"), cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not ckpt_path.exists():  # written after epoch 1: the stop lands inside epoch 2
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint after epoch 1"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    stopped = torch.load(ckpt_path, weights_only=False)
    assert stopped["epoch"] == 1 and 0 < stopped["epoch_examples"] < 2000
    assert stopped["examples_seen"] == 2000 + stopped["epoch_examples"]
    resumed = run_app(["train"], env("stopped"), tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({stopped['epoch_examples']} of epoch 2)" in resumed.stdout

    final = torch.load(ckpt_path, weights_only=False)
    reference = torch.load(tmp_path / "outputs" / "straight" / "checkpoint.pt", weights_only=False)
    assert final["examples_seen"] == reference["examples_seen"] == 4000
    assert final["epoch_examples"] == 0
    # the same examples in the same order from the same weights: the same model
    for name, weight in reference["model"].items():
        torch.testing.assert_close(final["model"][name], weight, rtol=0, atol=1e-6)
    # the step axis: the stopped and the resumed run's log points together are the uninterrupted run's
    [straight_run] = runlog.find(tmp_path / "straight" / "runs")
    first, second = sorted(runlog.find(tmp_path / "stopped" / "runs"), key=lambda f: runlog.read(f).exit_code != 143)
    assert runlog.read(first).exit_code == 143 and runlog.read(second).exit_code == 0
    assert _loss_steps(first) + _loss_steps(second) == _loss_steps(straight_run)
    val_steps = [s for s, _ in runlog.read(second).metric("val_loss")]
    assert val_steps == [4000] and runlog.read(second).summary["test_accuracy"] > 0.5
