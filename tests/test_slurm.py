"""deploy/slurm/agents.sbatch on a real single-node Slurm with two (fake) GPUs: a job array of 4 agents on
an offline grid sweep in a real PostgreSQL, one task stopped mid-trial with `scancel --signal=TERM --full`
and requeued; then the same script serving a W&B sweep (the unmodified `wandb agent`, the tests'
stand-in W&B API).

    CI=true .venv/bin/python -m pytest -q -s tests/test_slurm.py     (as root; prints the figures)
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from cluster import postgres_server, slurm_cluster
from conftest import REPO, clean_env
from fake_wandb import FakeWandb
from idx import write_dataset
from optuna.trial import TrialState

from app import runlog
from app.sweep.study import open_storage

pytestmark = pytest.mark.slow
SCRIPT = REPO / "deploy" / "slurm" / "agents.sbatch"
LINE = re.compile(r"^slurm (?P<task>\d+_\d+) \| (?P<text>.*)$")

GRID_YAML = """name: slurm-grid
method: grid
metric: {name: val_accuracy, goal: maximize}
parameters:
  learning_rate: {values: [0.003, 0.03]}
  batch_size: {values: [32, 64]}
"""
WANDB_GRID = {
    "method": "grid",
    "metric": {"name": "val_accuracy", "goal": "maximize"},
    "parameters": {"learning_rate": {"values": [0.003, 0.03]}},
    "command": ["${env}", "${interpreter}", "-m", "app", "train", "${args}"],
}


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """MNIST-format data big enough that an epoch lasts a few seconds: time to stop a task mid-trial."""
    root = tmp_path_factory.mktemp("slurm-data")
    write_dataset(root, "mnist", n_train=4000, n_test=200)
    return root


def project(tmp: Path, data: Path, **settings: str) -> Path:
    """A submit folder as a user has it: .env with the settings; the venv is this one (APP_PYTHON)."""
    folder = tmp / "project"
    folder.mkdir()
    lines = {"APP_PYTHON": sys.executable, "DATASET": "mnist", "DATA_DIR": str(data), "VAL_SIZE": "200", "EPOCHS": "2",
             "WATCH_LOG": "none", "DEVICE": "cpu", "WANDB_SILENT": "true", "TRAIN_STRIDE": "1", **settings}
    (folder / ".env").write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return folder


@dataclass
class Span:
    task: str
    restart: int
    gpu: str
    pid: int = 0
    start: float = 0.0
    end: float | None = None
    status: int | None = None


def spans(folder: Path) -> list[Span]:
    """Each run of each array task, from the script's own lines in the %x-%A_%a.out logs."""
    out: list[Span] = []
    for log in sorted(folder.glob("mnist-sweep-*.out")):
        for line in log.read_text().splitlines():
            m = LINE.match(line)
            if not m:
                continue
            text = m["text"]
            if s := re.match(r"start on \S+ restart=(\d+) CUDA_VISIBLE_DEVICES=(\S*) at ([\d.]+)", text):
                out.append(Span(m["task"], int(s[1]), s[2], start=float(s[3])))
            elif s := re.match(r"agent pid (\d+)", text):
                out[-1].pid = int(s[1])
            elif s := re.match(r"agent exited with status (\d+) at ([\d.]+)", text):
                out[-1].status, out[-1].end = int(s[1]), float(s[2])
    return out


def task_logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*.out")))


def submit(cluster, folder: Path, env: dict[str, str], array: str) -> str:
    """sbatch from the project folder; the caller's environment travels with the job (sbatch --export=ALL)."""
    env = {**env, "OMP_NUM_THREADS": "1"}  # two agents on this 2-core machine: one thread each
    r = cluster.run(["sbatch", "--parsable", f"--array={array}", str(SCRIPT)], cwd=folder, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def running(cluster, job: str) -> list[str]:
    r = cluster.run(["squeue", "-h", "-j", job, "-t", "RUNNING", "-o", "%i"])
    return r.stdout.split()


def queued(cluster, job: str) -> bool:
    return bool(cluster.run(["squeue", "-h", "-j", job, "-o", "%i"]).stdout.strip())


def wait_done(cluster, job: str, folder: Path, timeout: float, seen: list[int]) -> None:
    """Poll squeue (sbatch --wait polls at 2, 10, 42... s) until the array is gone; notes concurrency."""
    deadline = time.monotonic() + timeout
    while queued(cluster, job):
        seen.append(len(running(cluster, job)))
        if time.monotonic() > deadline:
            cluster.run(["scancel", job])
            pytest.fail(f"job {job} still queued after {timeout} s\n{task_logs(folder)}\n{cluster.logs()}")
        time.sleep(0.5)


def check_concurrency(all_spans: list[Span]) -> int:
    """Tasks that ran at the same time had different GPUs; returns the most that ran at once."""
    most = 0
    for a in all_spans:
        together = [b for b in all_spans if b.start <= a.start < (b.end or float("inf"))]
        most = max(most, len(together))
        assert len({b.gpu for b in together}) == len(together), together
    return most


def test_array_of_agents_on_an_offline_sweep_with_a_stop_and_requeue(cluster, data, tmp_path, record_property):
    t0 = time.monotonic()
    with postgres_server() as storage:
        sweep = tmp_path / "grid.yaml"
        sweep.write_text(GRID_YAML)
        folder = project(tmp_path, data, SWEEP_CONFIG=str(sweep), SWEEP_STORAGE=storage, WANDB_MODE="offline",
                         SWEEP_HEARTBEAT_S="2")
        env = clean_env(tmp_path, **cluster.env)
        job = submit(cluster, folder, env, "0-3")
        seen: list[int] = []
        deadline = time.monotonic() + 150
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, f"no trial reached epoch 1\n{task_logs(folder)}\n{cluster.logs()}"
            seen.append(len(running(cluster, job)))
            try:
                # the driver installed here is psycopg2 (SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3)
                url = storage.replace("postgresql://", "postgresql+psycopg2://", 1)
                study = optuna.load_study(study_name="slurm-grid", storage=open_storage(url, write=False))
            except KeyError:
                time.sleep(0.5)
                continue
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                run_id = t.user_attrs.get("run_id")
                if run_id and (folder / "outputs" / run_id / "checkpoint.pt").exists():
                    victim = t
                    break
            time.sleep(0.2)
        pid = int(victim.user_attrs["agent"].rsplit(":", 1)[1])
        (task,) = [s.task for s in spans(folder) if s.pid == pid]
        stop = subprocess.Popen(["scancel", "--signal=TERM", "--full", task], env={**env, **cluster.env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while f"slurm {task} | SIGTERM: stopping the agent" not in task_logs(folder):
                assert time.monotonic() < deadline, f"{task} never got the signal\n{task_logs(folder)}"
                time.sleep(0.2)
        finally:
            # delivered; but Slurm 22.05 answers a signal to one array task while others still pend with "Job can
            # not be altered now" and scancel repeats it every few seconds, which would stop the requeued rerun too
            stop.terminate()
            stop.wait()
        wait_done(cluster, job, folder, 240, seen)
        trials = study.get_trials(deepcopy=False)

    logs = task_logs(folder)
    all_spans = spans(folder)
    # every grid point completed exactly once
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.system_attrs["sweep_key"] for t in complete) == [f"grid-{i}" for i in range(4)], logs
    # the stopped trial checkpointed, was marked preempted, and its retry resumed from that checkpoint
    stopped = next(t for t in trials if t.number == victim.number)
    assert stopped.state == TrialState.FAIL and stopped.system_attrs["sweep_outcome"] == "preempted"
    retry = next(t for t in complete if t.system_attrs["sweep_key"] == victim.system_attrs["sweep_key"])
    assert retry.user_attrs["resume_run"] == victim.user_attrs["run_id"]
    assert f"resuming from run {victim.user_attrs['run_id']}'s checkpoint after epoch 1" in logs
    runs = {r.run_id: r for r in (runlog.read(f) for f in runlog.find(folder / "runs"))}
    assert runs[victim.user_attrs["run_id"]].preempting and runs[victim.user_attrs["run_id"]].exit_code == 143
    # the stopped task requeued itself and ran again
    mine = [s for s in all_spans if s.task == task]
    assert [s.restart for s in mine] == [0, 1] and mine[0].status == 143 and mine[1].status == 0, logs
    assert f"slurm {task} | SIGTERM: stopping the agent" in logs and f"slurm {task} | requeueing" in logs
    assert sorted({s.task for s in all_spans}) == [f"{job}_{i}" for i in range(4)]
    assert all(s.status == 0 for s in all_spans if s is not mine[0]), logs
    # never more than the 2 GPUs' worth at once, and tasks together had different GPUs
    most = check_concurrency(all_spans)
    assert max(seen) <= 2 and most == 2, (seen, all_spans)
    # each trial's W&B run records the device its task was given
    by_pid = {s.pid: s.gpu for s in all_spans}
    for t in complete:
        run = runs[t.user_attrs["run_id"]]
        assert run.exit_code == 0 and run.group == "slurm-grid"
        assert run.summary["cuda_visible_devices"] == by_pid[int(t.user_attrs["agent"].rsplit(":", 1)[1])]
    assert {runs[t.user_attrs["run_id"]].summary["cuda_visible_devices"] for t in complete} <= {"0", "1"}
    wall = time.monotonic() - t0
    figures = (f"slurm offline sweep: {len(all_spans)} task runs of 4 tasks, at most {most} at once "
               f"(squeue: {max(seen)}), 1 stop -> 1 requeue, {len(trials)} trials for 4 grid points, {wall:.0f} s")
    record_property("slurm_offline", figures)
    print("\n" + figures)


def test_the_same_script_serves_a_wandb_sweep(cluster, data, tmp_path, record_property):
    t0 = time.monotonic()
    with FakeWandb(WANDB_GRID) as api:
        folder = project(tmp_path, data, SWEEP_ID=api.sweep_path, WANDB_BASE_URL=api.url, WANDB_API_KEY="k" * 40,
                         AGENT_RUN_MODE="offline", EPOCHS="1")
        env = clean_env(tmp_path, **cluster.env)
        job = submit(cluster, folder, env, "0-1")
        seen: list[int] = []
        wait_done(cluster, job, folder, 180, seen)
    logs = task_logs(folder)
    assert "wandb agent" in logs and "--forward-signals" in logs, logs
    all_spans = spans(folder)
    assert len(all_spans) == 2 and all(s.status == 0 for s in all_spans), logs
    check_concurrency(all_spans)
    runs = [runlog.read(f) for f in runlog.find(folder / "runs")]
    done = [r for r in runs if r.exit_code == 0]
    assert sorted(r.config["learning_rate"] for r in done) == [0.003, 0.03], logs
    assert all(r.sweep_id == api.sweep_id for r in done)
    assert {r.summary["cuda_visible_devices"] for r in done} <= {s.gpu for s in all_spans} <= {"0", "1"}
    wall = time.monotonic() - t0
    record_property("slurm_wandb", f"{len(all_spans)} tasks, {len(done)} runs, {wall:.0f} s")
    print(f"\nslurm W&B sweep: {len(all_spans)} tasks, {len(done)} runs, {wall:.0f} s")


def test_shard_gres_shares_one_gpu_between_tasks(cluster, tmp_path):
    """`--gres=shard:1` (GPU sharing, deploy/slurm/README.md): 4 tasks per GPU, each told its GPU."""
    out = tmp_path / "shards"
    out.mkdir()
    r = cluster.run(["sbatch", "--parsable", "--array=0-7", "--gres=shard:1", "--cpus-per-task=1",
                     f"--output={out}/%a.out", "--wrap", "echo CVD=$CUDA_VISIBLE_DEVICES; sleep 3"])
    assert r.returncode == 0, r.stderr
    wait_done(cluster, r.stdout.strip().split(";")[0], out, 60, [])
    gpus = sorted(re.search(r"CVD=(\S*)", p.read_text())[1] for p in out.glob("*.out"))
    assert len(gpus) == 8 and set(gpus) <= {"0", "1"}, gpus


def test_a_cancelled_task_stays_cancelled(cluster, tmp_path):
    """Plain `scancel` also sends SIGTERM (the run checkpoints), but the task must not requeue itself."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / ".env").write_text("APP_EXEC=sleep 60\n")  # the agent's place, through the image runner hook
    job = submit(cluster, folder, clean_env(tmp_path, **cluster.env), "0")
    deadline = time.monotonic() + 30
    while "agent pid" not in task_logs(folder):
        assert time.monotonic() < deadline, task_logs(folder)
        time.sleep(0.2)
    assert cluster.run(["scancel", job]).returncode == 0
    wait_done(cluster, job, folder, 60, [])
    time.sleep(3)  # a requeue would show up in the queue again
    logs = task_logs(folder)
    assert not queued(cluster, job), logs
    (span,) = spans(folder)
    assert span.status == 143 and re.search(r"not requeued \(JobState=(CANCELLED|COMPLETING)\)", logs), logs
    assert "requeueing" not in logs
