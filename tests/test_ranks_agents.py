"""GPUS_PER_TRIAL=2 in every agent mode, on the CPU with 2 gloo ranks: the offline agent (Optuna), and the
W&B agents, per-run and warm, against the stand-in W&B API. The sweep varies `kernels`: DDP refuses ranks
whose models differ, so a trial that trains proves rank 1 got the sweep's values from rank 0. Every run
handed out is recorded once (by rank 0); a rank frozen or killed mid-trial fails that trial alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import clean_env
from fake_wandb import FakeWandb
from optuna.trial import TrialState
from idx import write_dataset
import procs
from test_warm_agent import agent_env, grid, runs_in, start_agent

from app import runlog
from app.sweep.optuna import plan as osw
from app.sweep.optuna import storage as sweep_storage

KERNELS = [[4, 8], [6, 12], [8, 16]]


@pytest.fixture(scope="module")
def ranks_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("agents-data")
    write_dataset(root, "mnist", n_train=2000, n_test=201)
    return root


def _rank1_of_trial(proc: subprocess.Popen, outputs: Path, trial: int, timeout: float = 240) -> int:
    """Rank 1 of trial `trial` (0, 1, ...) once that trial wrote its first checkpoint (its first epoch
    done); the earlier trials' ranks have ended by then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(outputs.glob("*/checkpoint.pt"))) > trial:
            found = procs.started_ranks(proc.pid)
            if found:
                return found[0]
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"trial {trial} never reached its first checkpoint (rc {proc.poll()})")


def test_offline_agent_trains_each_trial_on_two_ranks_and_a_frozen_or_killed_rank_fails_that_trial_alone(
        tmp_path, ranks_data):
    """Rank 1 of trial 0 frozen (SIGSTOP): that trial fails after RANK_TIMEOUT_S and its rank is ended;
    rank 1 of trial 1, which trains on, killed (SIGKILL): that trial fails at once; trial 2 trains."""
    cfg = tmp_path / "ranks.yaml"
    cfg.write_text("name: ranks\nmethod: grid\nmetric: {name: val_accuracy, goal: maximize}\n"
                   f"parameters:\n  kernels: {{values: {KERNELS}}}\n")
    env = clean_env(tmp_path, SWEEP_CONFIG=str(cfg), DATASET="mnist", DATA_DIR=str(ranks_data), EPOCHS="2",
                    TRAIN_STRIDE="1", VAL_SIZE="200", BATCH_SIZE="32", LOG_INTERVAL="4", WATCH_LOG="none",
                    DEVICE="cpu", WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path / "runs"),
                    OUTPUT_DIR=str(tmp_path / "outputs"), SWEEP_HEARTBEAT_S="1", GPUS_PER_TRIAL="2",
                    OMP_NUM_THREADS="1", RANK_TIMEOUT_S="10")
    log = tmp_path / "agent.log"
    proc = subprocess.Popen([sys.executable, "-m", "app", "offline-agent"], env=env, cwd=tmp_path,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    frozen = None
    try:
        frozen = _rank1_of_trial(proc, tmp_path / "outputs", 0)
        os.kill(frozen, signal.SIGSTOP)
        os.kill(_rank1_of_trial(proc, tmp_path / "outputs", 1), signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        left = frozen is not None and not procs.gone(frozen)
        if left:
            os.kill(frozen, signal.SIGKILL)
    out = log.read_text()
    assert "trial 0 failed: RankLost: rank 1 of 2 silent for RANK_TIMEOUT_S=10 s; the trial fails" in out, out[-4000:]
    assert "trial 1 failed: RankLost: rank 1 of 2 killed by SIGKILL; the trial fails" in out, out[-4000:]
    assert not left  # the frozen rank was ended with its trial, not left stopped
    assert "Traceback" not in out, out[-4000:]
    study = optuna.load_study(study_name="ranks", storage=sweep_storage.open_storage(osw.storage_url(env, "ranks")))
    states = {t.number: t.state for t in study.trials}
    assert states[0] == states[1] == TrialState.FAIL and "rank 1 of 2" in study.trials[0].user_attrs["error"]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(study.trials) == 3 and [t.number for t in done] == [2], out[-4000:]  # the agent went on
    assert sorted(t.user_attrs["values"]["kernels"] for t in study.trials) == sorted(KERNELS)
    runs = {r.run_id: r for r in (runlog.read(f) for f in runlog.find(tmp_path / "runs"))}
    assert len(runs) == len(study.trials)  # one record per trial, rank 0's: rank 1 writes none
    assert runs[study.trials[0].user_attrs["run_id"]].exit_code == runs[study.trials[1].user_attrs["run_id"]].exit_code == 1
    for t in done:
        run = runs[t.user_attrs["run_id"]]
        assert run.exit_code == 0 and run.config["kernels"] == t.user_attrs["values"]["kernels"]
        assert (tmp_path / "outputs" / run.run_id / "model.onnx").is_file()


@pytest.mark.parametrize("process", ["per-run", "warm"])
def test_wandb_agents_train_each_run_on_two_ranks(tmp_path, ranks_data, process):
    with FakeWandb(grid(kernels=KERNELS)) as api:
        env = agent_env(tmp_path, api, ranks_data, AGENT_PROCESS=process, GPUS_PER_TRIAL="2", DATASET="mnist",
                        TRAIN_STRIDE="1", DEVICE="cpu", WATCH_LOG="none", OMP_NUM_THREADS="1")
        proc = start_agent(env, tmp_path)
        try:
            assert proc.wait(timeout=600) == 0, (tmp_path / "agent.log").read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        handed = {a.run_id: a.params for a in api.assignments}
    runs = runs_in(tmp_path / "runs")
    assert sorted(runs) == sorted(handed) and len(runs) == 3  # each run handed out, recorded once
    for run_id, (_, run) in runs.items():
        assert run.exit_code == 0 and run.config["kernels"] == handed[run_id]["kernels"], run_id
        assert (tmp_path / "outputs" / run_id / "model.onnx").is_file()
