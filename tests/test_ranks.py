"""A trial on several ranks (GPUS_PER_TRIAL, app.ranks), proved on the CPU with 2 gloo ranks: the same
loss curve and test accuracy as one rank, a stop on any rank stops every rank at the same step and the
run resumes to the same end, a killed or frozen rank fails the trial in bounded time with one line naming
it, and no wait for rank 0's own work is bounded by RANK_TIMEOUT_S."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import clean_env, error_lines, run_app
from idx import write_dataset
import procs

from app import data, ranks, runlog, settings
from app.config import Config
from app.errors import UserError

N_TRAIN, VAL, BATCH = 2000, 200, 32  # 57 steps an epoch, the last one short (1800 = 56 x 32 + 8)


def ranks_env(tmp: Path, data_dir: Path, run_id: str, n: int, **extra: str) -> dict[str, str]:
    return clean_env(tmp, **{**dict(
        DATA_DIR=str(data_dir), DATASET="mnist", VAL_SIZE=str(VAL), TRAIN_STRIDE="1", BATCH_SIZE=str(BATCH),
        LEARNING_RATE="0.0003", LOG_INTERVAL="4", EPOCHS="2", DEVICE="cpu", WATCH_LOG="none", WANDB_MODE="offline",
        WANDB_DIR=str(tmp / f"runs-{run_id}"), OUTPUT_DIR=str(tmp / "outputs"), WANDB_RUN_ID=run_id,
        GPUS_PER_TRIAL=str(n), OMP_NUM_THREADS="1"), **extra})  # two ranks on two shared cores: one thread each


@pytest.fixture(scope="module")
def ranks_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks-data")
    write_dataset(root, "mnist", n_train=N_TRAIN, n_test=201)  # 201: the ranks' test shards differ in size
    return root


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, ranks_data):
    """The same run (seed 0) on one rank and on two; each run's offline record."""
    tmp = tmp_path_factory.mktemp("one-and-two")
    out = {}
    for n in (1, 2):
        started = time.monotonic()
        proc = run_app(["train"], ranks_env(tmp, ranks_data, f"ranks{n}", n), tmp, timeout=400)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        [folder] = runlog.find(tmp / f"runs-ranks{n}")
        out[n] = (runlog.read(folder), proc, time.monotonic() - started)
    return tmp, out


def test_two_ranks_train_as_one(one_and_two):
    """The core proof: each rank takes its half of every batch of the same order, DDP averages the
    gradients, val and test sums are reduced; the curves and results equal one rank's within float noise."""
    tmp, out = one_and_two
    (one, _, _), (two, proc, _) = out[1], out[2]
    for key in ("loss", "val_loss", "val_accuracy"):
        a, b = one.metric(key), two.metric(key)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 2, key
        assert all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for (_, x), (_, y) in zip(a, b)), (key, a, b)
    assert one.metric("loss")[0][1] > one.metric("loss")[-1][1] * 1.5  # it trained: the comparison means something
    for key in ("test_accuracy", "test_loss"):
        assert math.isclose(one.summary[key], two.summary[key], rel_tol=1e-4), key
    # rank 0 alone records: one run, one checkpoint (the unwrapped model's: it loads into a plain ConvNet)
    assert len(runlog.find(tmp / "runs-ranks2")) == 1
    state = torch.load(tmp / "outputs" / "ranks2" / "checkpoint.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["examples_seen"] == 2 * (N_TRAIN - VAL)
    assert [line for line in proc.stdout.splitlines() if line.startswith("test_accuracy")] == \
        [f"test_accuracy {two.summary['test_accuracy']:.4f} test_loss {two.summary['test_loss']:.4f}"]  # rank 0's alone


def test_gpus_per_trial_is_a_bounded_count():
    assert settings.get("GPUS_PER_TRIAL", {}) == 1 and settings.get("GPUS_PER_TRIAL", {"GPUS_PER_TRIAL": ""}) == 1
    assert settings.get("GPUS_PER_TRIAL", {"GPUS_PER_TRIAL": "4"}) == 4
    for bad in ("0", "65", "two", "-2"):
        with pytest.raises(UserError, match=r"^GPUS_PER_TRIAL='.*' must be a positive integer \(GPUs per trial, at most 64\)$"):
            settings.get("GPUS_PER_TRIAL", {"GPUS_PER_TRIAL": bad})


def test_a_batch_the_ranks_cannot_split_is_refused_before_any_run(tmp_path, ranks_data):
    proc = run_app(["train", "--batch_size=33"], ranks_env(tmp_path, ranks_data, "split33", 2), tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["error: batch_size=33 must be a multiple of GPUS_PER_TRIAL=2: the global "
                                        "batch is split evenly over the ranks"], proc.stderr[-2000:]
    assert runlog.find(tmp_path / "runs-split33") == []  # no W&B run was opened


def test_each_rank_takes_its_share_of_the_same_order():
    """Two ranks' shares of each batch, put together, are one rank's batch (the short last one too)."""
    split = data.Split(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(),
                       torch.arange(10))
    def batches(rank: int, n: int):
        gen = torch.Generator().manual_seed(3)
        return list(data.Batches(split, 4, 0.0, 1.0, shuffle=True, generator=gen).shards_from(0, rank, n))
    whole = batches(0, 1)
    halves = list(zip(batches(0, 2), batches(1, 2)))
    assert [t for _, _, t in whole] == [4, 4, 2]
    for (_, y, total), ((_, y0, t0), (_, y1, t1)) in zip(whole, halves):
        assert t0 == t1 == total and torch.equal(torch.cat([y0, y1]), y)
    assert [len(y1) for _, (_, y1, _) in halves] == [2, 2, 0]  # the short last batch leaves rank 1 none
    assert [len(data.shard(split, r, 3)) for r in range(3)] == [3, 3, 4]


def test_a_stop_sent_to_rank_1_alone_stops_both_ranks_at_one_step_and_the_run_resumes_to_the_same_end(
        tmp_path, ranks_data, one_and_two):
    """SIGTERM to rank 1 only, inside epoch 2: the ranks agree on it at the step's end, rank 0 writes the
    checkpoint, marks the run preempting and exits 143; the run started again with the same id (and N)
    resumes there and ends where the uninterrupted run ended."""
    env = ranks_env(tmp_path, ranks_data, "stop2", 2)
    ckpt = tmp_path / "outputs" / "stop2" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "app", "train"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rank1 = procs.rank1(proc)
        procs.wait_for(ckpt, proc)  # end of epoch 1: the stop lands in epoch 2
        os.kill(rank1, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM: checkpoint written, run marked preempting" in err
    stopped = torch.load(ckpt, weights_only=False)
    assert stopped["epoch"] == 1 and 0 < stopped["epoch_examples"] < N_TRAIN - VAL
    assert stopped["epoch_examples"] % BATCH == 0  # after a whole step, on both ranks
    [first] = runlog.find(tmp_path / "runs-stop2")
    assert runlog.read(first).preempting and runlog.read(first).exit_code == 143

    again = run_app(["train"], env, tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"({stopped['epoch_examples']} of epoch 2)" in again.stdout
    [second] = [f for f in runlog.find(tmp_path / "runs-stop2") if f != first]
    resumed, (whole, _, _) = runlog.read(second), one_and_two[1][1]
    assert resumed.exit_code == 0 and not resumed.preempting
    assert math.isclose(resumed.summary["test_loss"], whole.summary["test_loss"], rel_tol=1e-4)
    assert torch.load(ckpt, weights_only=False)["examples_seen"] == 2 * (N_TRAIN - VAL)


def test_a_killed_rank_fails_the_run_in_bounded_time_in_one_line(tmp_path, ranks_data):
    """SIGKILL to rank 1 mid-training: rank 0's next collective fails at once (the rank's connections
    close), the run is recorded failed (exit 1) and the error names the rank; nothing waits for a timeout."""
    env = ranks_env(tmp_path, ranks_data, "kill2", 2, EPOCHS="3")
    proc = subprocess.Popen([sys.executable, "-m", "app", "train"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rank1 = procs.rank1(proc)
        procs.wait_for(tmp_path / "outputs" / "kill2" / "checkpoint.pt", proc)
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=ranks.TIMEOUT_S + 60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert error_lines(err) == ["error: rank 1 of 2 killed by SIGKILL; the trial fails"], err[-3000:]
    assert "Traceback" not in err
    assert took < 30, took  # far inside ranks.TIMEOUT_S: a dead rank is seen at once
    [folder] = runlog.find(tmp_path / "runs-kill2")
    assert runlog.read(folder).exit_code == 1


def test_a_frozen_rank_fails_the_run_within_rank_timeout_s_in_one_line_and_is_not_left_behind(tmp_path, ranks_data):
    """SIGSTOP to rank 1 mid-training: it neither answers nor closes its connections. Rank 0's next
    collective gives up after RANK_TIMEOUT_S, the run is recorded failed (exit 1) with one line naming the
    rank, and the frozen rank is killed, not left stopped."""
    env = ranks_env(tmp_path, ranks_data, "hang2", 2, EPOCHS="3", RANK_TIMEOUT_S="10")
    proc = subprocess.Popen([sys.executable, "-m", "app", "train"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rank1 = None
    try:
        rank1 = procs.rank1(proc)
        procs.wait_for(tmp_path / "outputs" / "hang2" / "checkpoint.pt", proc)
        os.kill(rank1, signal.SIGSTOP)
        frozen = time.monotonic()
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - frozen
    finally:
        if proc.poll() is None:
            proc.kill()
        alive = rank1 is not None and not procs.gone(rank1)
        if alive:
            os.kill(rank1, signal.SIGKILL)  # a failed test leaves no stopped process either
    assert proc.returncode == 1, err[-3000:]
    assert error_lines(err) == ["error: rank 1 of 2 silent for RANK_TIMEOUT_S=10 s; the trial fails"], err[-3000:]
    assert "Traceback" not in err
    assert 10 <= took < 30, took  # the bound, not ranks.TIMEOUT_S's 120 s
    assert not alive  # rank 0 ended it (SIGKILL reaches a stopped process) and reaped it
    [folder] = runlog.find(tmp_path / "runs-hang2")
    assert runlog.read(folder).exit_code == 1


SLOW_LEAD = """
import sys, time
from app import runner

def report(epoch, metrics):  # rank 0's own work after an epoch: a report to a slow sweep storage, then a prune
    if epoch == 0:
        time.sleep(float(sys.argv[1]))
    return epoch == 1

sys.exit(runner.run(runner.prepare([], dotenv_path=None), on_epoch=report))
"""


def test_the_other_ranks_wait_for_rank_0s_own_work_longer_than_rank_timeout_s(tmp_path, ranks_data):
    """After each epoch rank 0 alone logs, checkpoints and reports to the sweep (`on_epoch`) while rank 1
    waits for its decision: that wait is as long as rank 0's work takes, not RANK_TIMEOUT_S (with a
    collective there, rank 1 gave up after 5 s and the run failed), and the decision reaches it: both
    ranks stop early after epoch 2 (rank 1 training on alone would fail in one line)."""
    env = ranks_env(tmp_path, ranks_data, "slow0", 2, EPOCHS="3", RANK_TIMEOUT_S="5")
    proc = subprocess.run([sys.executable, "-c", SLOW_LEAD, "8"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped early after epoch 2" in proc.stdout, proc.stdout[-2000:]
    assert "error" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [folder] = runlog.find(tmp_path / "runs-slow0")
    run = runlog.read(folder)
    assert run.exit_code == 0 and run.summary["pruned"] is True
    assert torch.load(tmp_path / "outputs" / "slow0" / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_rank_timeout_s_is_a_bounded_number_of_seconds():
    assert settings.get("RANK_TIMEOUT_S", {}) == ranks.TIMEOUT_S == 120
    assert settings.get("RANK_TIMEOUT_S", {"RANK_TIMEOUT_S": "2.5"}) == 2.5
    for bad in ("0", "3601", "soon", "-1"):
        with pytest.raises(UserError, match=r"^RANK_TIMEOUT_S='.*' must be seconds above 0, at most 3600$"):
            settings.get("RANK_TIMEOUT_S", {"RANK_TIMEOUT_S": bad})


def test_a_bad_rank_timeout_is_refused_before_any_run(tmp_path, ranks_data):
    proc = run_app(["train"], ranks_env(tmp_path, ranks_data, "badtimeout", 2, RANK_TIMEOUT_S="0"), tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["error: RANK_TIMEOUT_S='0' must be seconds above 0, at most 3600"], proc.stderr[-2000:]
    assert runlog.find(tmp_path / "runs-badtimeout") == []


def test_one_rank_needs_no_process_group():
    team = ranks.Team()
    t = torch.ones(2)
    assert team.lead and team.sum(t) is t and team.agree_stop(None, t.device) is None
    assert team.agree_stop(15, t.device) == 15 and team.decide(True)
    ranks.check(Config(batch_size=33), 1)  # one rank splits nothing


# --- GPU placement: an agent holds a group of GPUS_PER_TRIAL whole GPUs ---

def test_agents_with_two_gpus_per_trial_get_disjoint_pairs_of_eight_and_a_fifth_is_refused(tmp_path):
    from test_gpu_slots import Agents

    agents = Agents(tmp_path, GPUS_PER_TRIAL="2", GPU_COUNT="8")
    try:
        slots = [agents.slot(p) for p in agents.start(4)]
        pairs = sorted(s["CUDA_VISIBLE_DEVICES"] for s in slots)
        assert pairs == ["0,1", "2,3", "4,5", "6,7"]  # 8 GPUs, N=2: 4 agents, no GPU in two groups
        assert sorted(int(s["AGENT_INDEX"]) for s in slots) == [0, 1, 2, 3]
        assert all(s["GPU_SLOT"] is None for s in slots)  # whole GPUs: no memory share to take
        (fifth,) = agents.start(1)
        assert fifth.wait(timeout=60) == 1
        assert "all 4 groups of GPUS_PER_TRIAL=2 GPUs are taken (8 GPUs): stop an agent or lower GPUS_PER_TRIAL" \
            in fifth.stderr.read()
        agents.procs[0].kill()  # its group is free again for the next agent
        agents.procs[0].wait()
        (sixth,) = agents.start(1)
        assert agents.slot(sixth)["CUDA_VISIBLE_DEVICES"] == slots[0]["CUDA_VISIBLE_DEVICES"]
    finally:
        agents.close()


@pytest.mark.parametrize("environ, where", [
    ({"GPU_COUNT": "3"}, "the 3 GPU(s) this agent sees (GPU_COUNT)"),
    ({"GPU_COUNT": "1"}, "the 1 GPU(s) this agent sees (GPU_COUNT)"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "the 1 GPU(s) this agent sees (CUDA_VISIBLE_DEVICES)"),
])
def test_gpus_an_agent_cannot_group_are_refused_at_its_start(tmp_path, environ, where):
    from app.container import gpu_slots

    with pytest.raises(UserError) as refused:
        gpu_slots.check({"GPU_SLOTS_DIR": str(tmp_path), "GPUS_PER_TRIAL": "2", **environ})
    assert str(refused.value) == f"GPUS_PER_TRIAL=2 must divide {where}: give it a multiple of 2 GPUs or change GPUS_PER_TRIAL"
    gpu_slots.check({"GPU_SLOTS_DIR": str(tmp_path), "GPUS_PER_TRIAL": "2", "CUDA_VISIBLE_DEVICES": "0,1"})  # Slurm's pair


def test_torchrun_ranks_join_and_rank_0_alone_records(tmp_path, ranks_data):
    """`torchrun --nproc-per-node=2 -m app train`: RANK/WORLD_SIZE given, rank 1 takes rank 0's values and
    run; one W&B run, one checkpoint, rank 0's lines only."""
    env = ranks_env(tmp_path, ranks_data, "torchrun2", 1, EPOCHS="1")  # WORLD_SIZE decides, not GPUS_PER_TRIAL
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc-per-node=2", "-m", "app", "train", "--kernels=[4,8]"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [folder] = runlog.find(tmp_path / "runs-torchrun2")
    run = runlog.read(folder)
    assert run.exit_code == 0 and run.config["kernels"] == [4, 8]
    assert [line for line in proc.stdout.splitlines() if line.startswith("done: run torchrun2")], proc.stdout
    assert sum(line.startswith("test_accuracy") for line in proc.stdout.splitlines()) == 1
    assert torch.load(tmp_path / "outputs" / "torchrun2" / "checkpoint.pt", weights_only=False)["examples_seen"] == N_TRAIN - VAL
