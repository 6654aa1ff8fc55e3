"""A job-wide stop of a per-run `wandb agent` (the entrypoint's agent mode, AGENT_PROCESS unset) while a run
is starting loses no run: every process of the agent signalled at once, as Slurm's plain `scancel` does
(and the entrypoint once more: the batch script passes its own copy on), then the next agent on the
sweep finishes the point under the run id W&B gave it. Natively, with the stand-in W&B API. A stop
mid-epoch: tests/test_slurm.py's plain `scancel` of a W&B sweep, on a real Slurm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, clean_env, wait_for
from fake_wandb import FakeWandb

from app import checkpoint, runlog

EPOCHS = 2
# the run's process starts 3 s after W&B's agent wrote its parameters: time to stop it before it exists
LATE_START = ["${env}", "sh", "-c", 'sleep 3; exec "$0" -m app train "$@"', "${interpreter}", "${args}"]
COMMAND = ["${env}", "${interpreter}", "-m", "app", "train", "${args}"]


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (as Slurm's process tracking sees a task), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop(0))
        todo.extend(children.get(out[-1], []))
    return out


def scancel(pid: int) -> None:
    """SIGTERM to every process of the tree at once, then the entrypoint's second copy (the batch script's)."""
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    os.kill(pid, signal.SIGTERM)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def start_agent(tmp: Path, api: FakeWandb, data: Path, log: str) -> subprocess.Popen:
    env = clean_env(tmp, APP_MODE="agent", SWEEP_ID=api.sweep_path, WANDB_BASE_URL=api.url, WANDB_API_KEY="k" * 40,
                    AGENT_RUN_MODE="offline", ALLOW_CPU="true", DATA_DIR=str(data), VAL_SIZE="200", EPOCHS=str(EPOCHS),
                    BATCH_SIZE="64", WANDB_DIR=str(tmp / "runs"), OUTPUT_DIR=str(tmp / "outputs"),
                    GPU_SLOTS_DIR=str(tmp / "slots"), WANDB_SILENT="true", OMP_NUM_THREADS="1",
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.Popen([sys.executable, "-m", "app.container.entrypoint"], env=env, cwd=REPO,
                            stdout=open(tmp / log, "ab"), stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before its process starts", "while it starts"])
def test_a_job_wide_stop_at_any_moment_of_a_run_loses_no_run(tmp_path: Path, small_data: Path, moment: str):
    sweep = {"method": "grid", "metric": {"name": "val_accuracy", "goal": "maximize"},
             "parameters": {"learning_rate": {"values": [0.01]}},
             "command": LATE_START if moment == "before its process starts" else COMMAND}
    log = lambda: (tmp_path / "agent.log").read_text()[-5000:]  # noqa: E731
    with FakeWandb(sweep) as api:
        agent = start_agent(tmp_path, api, small_data, "agent.log")
        run_id = wait_for(lambda: api.assignments and api.assignments[0].run_id, 120, "a hand-out", log)
        params = tmp_path / "runs" / "wandb" / f"sweep-{api.sweep_id}" / f"config-{run_id}.yaml"
        checkpoint_file = tmp_path / "outputs" / run_id / "checkpoint.pt"
        if moment == "before its process starts":  # W&B's agent wrote the parameters: the `sh` sleeps
            wait_for(params.exists, 60, "the run's parameter file", log)
        else:  # W&B's service is up under the run (wandb.init), nothing trained yet
            wait_for(lambda: any("wandb-core" in cmdline(p) for p in descendants(agent.pid)), 120, "W&B's service", log)
            assert not checkpoint_file.exists(), log()
        scancel(agent.pid)
        assert agent.wait(timeout=120) == 143, log()
        assert len(api.assignments) == 1, api.assignments
        # what W&B's server does: a run that reached it as preempting (its service outlived wandb.init's
        # stop) is handed out again; one that did not is the next agent's to resume
        told = any(runlog.read(f).preempting for f in runlog.find(tmp_path / "runs"))
        if told:
            api.requeue(run_id)
        again = start_agent(tmp_path, api, small_data, "again.log")
        assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()[-5000:]
    logs = log() + (tmp_path / "again.log").read_text()[-5000:]
    runs = [runlog.read(f) for f in runlog.find(tmp_path / "runs")]
    # the point finished once, under the run id W&B gave it; W&B handed out nothing else
    assert [(r.run_id, r.config["learning_rate"]) for r in runs if r.exit_code == 0] == [(run_id, 0.01)], logs
    assert [a.run_id for a in api.assignments] == [run_id] * (1 + told), api.assignments
    assert (f"resuming run {run_id} of sweep" in logs) is not told, logs
    assert checkpoint.load(checkpoint_file)["epoch"] == EPOCHS
    assert "Traceback" not in logs, logs
