"""deploy/slurm/agents.sbatch on a real single-node Slurm with two (fake) GPUs: a job array of 4 agents on
an offline grid sweep in a real PostgreSQL, one task stopped mid-trial with `scancel --signal=TERM --full`
and requeued; then the same script serving a W&B sweep (the unmodified `wandb agent`, the tests'
stand-in W&B API).

    CI=true .venv/bin/python -m pytest -q -s tests/test_slurm.py     (as root; prints the figures)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import podman_image
import pytest
from cluster import postgres_server, slurm_cluster, unavailable
from containers import app_image  # noqa: F401 (a fixture)
from conftest import REPO, clean_env
from fake_wandb import FakeWandb
from idx import write_dataset
from optuna.trial import TrialState

from app import runlog
from app.errors import UserError
from app.sweep.optuna.storage import load_study, open_storage

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
    """A submit folder as a user has it: .env with the settings; the venv is this one (APP_PYTHON,
    exported at submit: it is also what reads .env)."""
    folder = tmp / "project"
    folder.mkdir()
    lines = {"DATASET": "mnist", "DATA_DIR": str(data), "VAL_SIZE": "200", "EPOCHS": "2",
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
    job: str = ""  # the task's own SLURM_JOB_ID (the array's id for its last-started task)


def spans(folder: Path) -> list[Span]:
    """Each run of each array task, from the script's own lines in the %x-%A_%a.out logs."""
    out: list[Span] = []
    for log in sorted(folder.glob("mnist-sweep-*.out")):
        for line in log.read_text().splitlines():
            m = LINE.match(line)
            if not m:
                continue
            text = m["text"]
            if s := re.match(r"start on \S+ restart=(\d+) job=(\S+) CUDA_VISIBLE_DEVICES=(\S*) at ([\d.]+)", text):
                out.append(Span(m["task"], int(s[1]), s[3], start=float(s[4]), job=s[2]))
            elif s := re.match(r"agent pid (\d+)", text):
                out[-1].pid = int(s[1])
            elif s := re.match(r"agent exited with status (\d+) at ([\d.]+)", text):
                out[-1].status, out[-1].end = int(s[1]), float(s[2])
    return out


def task_logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*.out")))


def submit(cluster, folder: Path, env: dict[str, str], array: str) -> str:
    """sbatch from the project folder; the caller's environment travels with the job (sbatch --export=ALL)."""
    env = {**env, "OMP_NUM_THREADS": "1", "APP_PYTHON": sys.executable}  # two agents on 2 cores: a thread each
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


def journal_study(folder: Path, name: str = "slurm-grid"):
    """The sweep's study in the default journal storage (runs/sweeps/<name>.journal), once it exists."""
    journal = folder / "runs" / "sweeps" / f"{name}.journal"
    if not journal.exists():
        return None
    try:
        return load_study(str(journal), name)
    except UserError:
        return None


def wait_mid_trial(folder: Path, timeout: float, want=lambda span: True):
    """A RUNNING trial that has checkpointed, trained by a task whose current Span passes `want`."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"no trial reached a checkpoint\n{task_logs(folder)}"
        study = journal_study(folder)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if study else ():
            run_id = t.user_attrs.get("run_id")
            if run_id and (folder / "outputs" / run_id / "checkpoint.pt").exists():
                pid = int(t.user_attrs["agent"].rsplit(":", 1)[1])
                mine = [s for s in spans(folder) if s.pid == pid and s.end is None]
                if mine and want(mine[-1]):
                    return study, t, mine[-1]
        time.sleep(0.2)


def check_every_point_trained_once(trials, victim, logs: str, points: int = 4) -> list:
    """Every grid point completed exactly once, nothing left running, the stopped trial retried from its
    checkpoint; returns the completed trials."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.system_attrs["sweep_key"] for t in complete) == [f"grid-{i}" for i in range(points)], logs
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], logs
    stopped = next(t for t in trials if t.number == victim.number)
    assert stopped.state == TrialState.FAIL and stopped.system_attrs["sweep_outcome"] == "preempted", logs
    retry = next(t for t in complete if t.system_attrs["sweep_key"] == victim.system_attrs["sweep_key"])
    assert retry.user_attrs["resume_run"] == victim.user_attrs["run_id"], logs
    assert f"resuming from run {victim.user_attrs['run_id']}'s checkpoint" in logs
    return complete


def test_a_plain_scancel_mid_trial_loses_no_grid_point(cluster, data, tmp_path, record_property):
    """Plain `scancel JOB_TASK` signals every process of the task, W&B's own service included: the
    trial is a stop (checkpointed, handed out again), the agent takes no new trial and says so."""
    t0 = time.monotonic()
    sweep = tmp_path / "grid.yaml"
    sweep.write_text(GRID_YAML)
    folder = project(tmp_path, data, SWEEP_CONFIG=str(sweep), WANDB_MODE="offline", SWEEP_HEARTBEAT_S="2")
    env = clean_env(tmp_path, **cluster.env)
    job = submit(cluster, folder, env, "0-1")
    seen: list[int] = []
    study, victim, span = wait_mid_trial(folder, 150)
    assert cluster.run(["scancel", span.task]).returncode == 0
    wait_done(cluster, job, folder, 240, seen)
    trials = study.get_trials(deepcopy=False)
    logs = task_logs(folder)
    check_every_point_trained_once(trials, victim, logs)
    # the cancelled task's agent stopped at once: exit 143, its own line, no trial taken after the stop
    mine = [s for s in spans(folder) if s.task == span.task]
    assert len(mine) == 1 and mine[0].status == 143, logs
    assert f"agent stopped by SIGTERM: trial {victim.number} checkpointed" in logs, logs
    assert "stopped by stopped by" not in logs and "ConnectionResetError" not in logs, logs
    agent = victim.user_attrs["agent"]
    assert max(t.number for t in trials if t.user_attrs.get("agent") == agent) == victim.number, logs
    assert "requeueing" not in logs and not queued(cluster, job)
    # sweep-status in the submit folder, typed as deploy/slurm/README.md says, counts every point done
    status = subprocess.run([sys.executable, "-m", "app", "sweep-status", "runs", "--config", str(sweep)],
                            cwd=folder, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and "4 of 4 grid points done" in status.stdout, status.stdout + status.stderr
    wall = time.monotonic() - t0
    figures = (f"slurm plain scancel: 2 tasks, 1 cancelled mid-trial -> 0 requeues, {len(trials)} trials, "
               f"4 of 4 grid points trained once, {wall:.0f} s")
    record_property("slurm_scancel", figures)
    print("\n" + figures)


def test_the_arrays_last_started_task_is_requeued_by_its_own_id(cluster, data, tmp_path, record_property):
    """The task that runs under the array's own job id: a stop requeues that task, not the array."""
    t0 = time.monotonic()
    sweep = tmp_path / "grid.yaml"
    sweep.write_text(GRID_YAML)
    folder = project(tmp_path, data, SWEEP_CONFIG=str(sweep), WANDB_MODE="offline", SWEEP_HEARTBEAT_S="2")
    env = clean_env(tmp_path, **cluster.env)
    job = submit(cluster, folder, env, "0-1")
    seen: list[int] = []
    study, victim, span = wait_mid_trial(folder, 150, want=lambda s: s.job == job)
    assert span.task != job  # its name is <array>_<task>, its job id the array's own
    assert cluster.run(["scancel", "--signal=TERM", "--full", span.task]).returncode == 0
    wait_done(cluster, job, folder, 240, seen)
    trials = study.get_trials(deepcopy=False)
    logs = task_logs(folder)
    check_every_point_trained_once(trials, victim, logs)
    all_spans = spans(folder)
    mine = [s for s in all_spans if s.task == span.task]
    assert [s.restart for s in mine] == [0, 1] and mine[0].status == 143 and mine[1].status == 0, logs
    assert f"slurm {span.task} | requeueing" in logs and "not requeued" not in logs, logs
    others = [s for s in all_spans if s.task != span.task]
    assert len(others) == 1 and others[0].restart == 0 and others[0].status == 0, logs  # the array stayed put
    wall = time.monotonic() - t0
    figures = (f"slurm last-started task: 2 tasks, 1 stop -> 1 requeue of {span.task} (job id {job}), "
               f"{len(all_spans)} task runs, {len(trials)} trials, 4 of 4 grid points trained once, {wall:.0f} s")
    record_property("slurm_last_task", figures)
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


WANDB_GRID4 = {**WANDB_GRID, "parameters": {"learning_rate": {"values": [0.003, 0.03]}, "batch_size": {"values": [32, 64]}}}


def claims(folder: Path) -> dict[str, dict]:
    """The sweep's claim records (app.sweep.wandb.dedupe), by run id."""
    # <sweep>/<params>.json; the agents' hand-outs (<sweep>/handed-out/) are not claims
    docs = (json.loads(p.read_text()) for p in (folder / "runs" / ".sweep-claims").glob("*/*.json"))
    return {d["run_id"]: d for d in docs}


@pytest.mark.parametrize("process", ["per-run", "warm"])
def test_a_plain_scancel_of_a_wandb_sweep_loses_no_grid_point(cluster, data, tmp_path, record_property, process):
    """A plain `scancel` of the whole array mid-run ends W&B's service with the runs: W&B is never told
    they were preempting and never hands them out again. The log says so, and the next agents on the
    sweep (the array submitted again) resume them under their own run ids: every point trained once."""
    t0 = time.monotonic()
    with FakeWandb(WANDB_GRID4) as api:
        folder = project(tmp_path, data, SWEEP_ID=api.sweep_path, WANDB_BASE_URL=api.url, WANDB_API_KEY="k" * 40,
                         AGENT_RUN_MODE="offline", EPOCHS="3", AGENT_PROCESS=process)
        env = clean_env(tmp_path, **cluster.env)
        job = submit(cluster, folder, env, "0-1")
        deadline = time.monotonic() + 180
        # both tasks' runs are training (each has a checkpoint): "resumed from its checkpoint" below holds
        # for each; a stop while a run is still starting: tests/test_wandb_stops.py
        while len([r for r, d in claims(folder).items()
                   if d["state"] == "running" and (folder / "outputs" / r / "checkpoint.pt").exists()]) < 2:
            assert time.monotonic() < deadline, f"no two runs training at once\n{task_logs(folder)}"
            time.sleep(0.2)
        assert cluster.run(["scancel", job]).returncode == 0  # plain: every process of every task
        wait_done(cluster, job, folder, 120, [])
        stopped = {r: d for r, d in claims(folder).items() if d["state"] != "finished"}
        assert stopped, task_logs(folder)
        # what W&B's server does: a run that reached it as preempting is handed out again
        for f in runlog.find(folder / "runs"):
            if runlog.read(f).preempting:
                api.requeue(runlog.read(f).run_id)
        first_logs = "\n".join(p.read_text() for p in sorted(folder.glob("*.out")))
        again = submit(cluster, folder, env, "0-1")
        wait_done(cluster, again, folder, 300, [])
    logs = "\n".join(p.read_text() for p in sorted(folder.glob("*.out")))
    runs = [runlog.read(f) for f in runlog.find(folder / "runs")]
    done = [r for r in runs if r.exit_code == 0]
    # every grid point finished exactly once, each under the run id W&B gave it
    points = sorted((r.config["learning_rate"], r.config["batch_size"]) for r in done)
    assert points == [(0.003, 32), (0.003, 64), (0.03, 32), (0.03, 64)], logs
    assert {r.run_id for r in done} == {a.run_id for a in api.assignments if a.command == "run"}, logs
    assert len({a.run_id for a in api.assignments}) == 4, api.assignments
    # each stopped run was resumed from its checkpoint, not trained again from scratch
    for run_id in stopped:
        assert f"resuming run {run_id} from" in logs, logs
    assert all(d["state"] == "finished" for d in claims(folder).values()), claims(folder)
    # the log says what happened to W&B: a run W&B never heard of as preempting is not claimed to be one
    told = {r.run_id for r in runs if r.preempting}
    for run_id in set(stopped) - told:
        assert f"resuming run {run_id} of sweep" in logs, logs
    if set(stopped) - told:
        assert "W&B was not told the run is preempting" in first_logs, first_logs
    assert first_logs.count("run marked preempting") <= len(told), first_logs
    assert "ConnectionResetError" not in logs and "socket.send()" not in logs, logs
    wall = time.monotonic() - t0
    figures = (f"slurm W&B sweep ({process}), plain scancel: {len(stopped)} runs stopped, {len(told)} told to W&B, "
               f"{len(done)} of 4 points finished once, {wall:.0f} s")
    record_property(f"slurm_wandb_scancel_{process}", figures)
    print("\n" + figures)


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


def test_a_short_time_limit_stops_the_agent_a_quarter_of_it_before_the_end(cluster, tmp_path):
    """`--time=1` with the script's `--signal=B:TERM@120`: Slurm's warning would come before the task even
    started (every run stopped seconds in, requeued, stopped again). The script derives the warning from
    the limit instead: the agent runs until 15 s before the limit, then is stopped as by the warning."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / ".env").write_text("APP_EXEC=sleep 300\nREQUEUE_ON_STOP=false\n")  # the agent's place; no rerun
    env = {**clean_env(tmp_path, **cluster.env), "OMP_NUM_THREADS": "1", "APP_PYTHON": sys.executable}
    r = cluster.run(["sbatch", "--parsable", "--array=0", "--time=1", str(SCRIPT)], cwd=folder, env=env)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    wait_done(cluster, job, folder, 120, [])
    logs = task_logs(folder)
    (span,) = spans(folder)
    ran = span.end - span.start
    assert 38 <= ran <= 55 and span.status == 143, (ran, logs)
    assert re.search(r"time limit: [4-6]\d s left, too short for a 120 s warning .*: the agent is stopped "
                     r"\d+ s before the limit instead", logs), logs
    assert "time limit: stopping the agent" in logs and "SIGTERM: stopping the agent" not in logs, logs


# --- .env: one meaning for every reader --------------------------------------------------------------

# compose's (and python-dotenv's) meaning: a BOM is not part of the first key, spaces around `=` are
# allowed, a comment after a quoted or unquoted value is dropped, the last of duplicate keys wins, and
# nothing is evaluated (single quotes: not even compose's ${VAR})
HOSTILE = ("\ufeffEPOCHS = 2\n"
           'OUTPUT_DIR="/shared/out"  # team folder\n'
           'WANDB_PROJECT="team project" # x\n'
           "VAL_SIZE=200 # held out\n"
           "LEARNING_RATE=0.1\n"
           "LEARNING_RATE=0.2\n"
           "WANDB_NOTES='$(touch PWNED) `touch PWNED`; touch PWNED'\n")
MEANT = {"EPOCHS": "2", "OUTPUT_DIR": "/shared/out", "WANDB_PROJECT": "team project", "VAL_SIZE": "200",
         "LEARNING_RATE": "0.2", "WANDB_NOTES": "$(touch PWNED) `touch PWNED`; touch PWNED"}
REFUSED = {"EPOCH=2\n": "unknown setting EPOCH; did you mean EPOCHS?",
           "EPOCHS=2\nnot a setting\n": "'not a setting' is not a KEY=value line"}


def read_by_sbatch(folder: Path, **env: str) -> subprocess.CompletedProcess:
    """agents.sbatch's own .env handling, run by bash outside Slurm; the agent's place prints its environment."""
    return subprocess.run(["bash", str(SCRIPT)], cwd=folder, capture_output=True, text=True, timeout=60,
                          env=clean_env(folder, **{"APP_PYTHON": sys.executable, "APP_EXEC": "env", **env}))


def environment_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("slurm "))


def test_every_reader_gives_a_dotenv_the_same_meaning(tmp_path):
    from app import sources
    from app.container.launch import read_env_file

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / ".env").write_text(HOSTILE, encoding="utf-8")
    assert sources.read_dotenv(folder / ".env") == MEANT  # the package (python -m app train/offline-agent)
    assert read_env_file(folder / ".env") == MEANT  # python -m app launch --env-file
    (folder / "compose.yml").write_text("services:\n  t:\n    image: busybox\n    env_file:\n      - path: .env\n")
    r = subprocess.run(["docker", "compose", "-f", "compose.yml", "config", "--format", "json"], cwd=folder,
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "CI" not in os.environ:
        pytest.skip(f"docker compose is not usable here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    composed = json.loads(r.stdout)["services"]["t"]["environment"]
    assert {k: v.replace("$$", "$") for k, v in composed.items()} == MEANT  # config escapes $ as $$
    r = read_by_sbatch(folder)
    assert r.returncode == 0, r.stderr
    seen = environment_lines(r.stdout)
    assert {k: seen.get(k) for k in MEANT} == MEANT, r.stdout
    assert not list(folder.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
    # exported where sbatch runs wins over the file, as documented
    seen = environment_lines(read_by_sbatch(folder, EPOCHS="7", OUTPUT_DIR="/mine").stdout)
    assert (seen["EPOCHS"], seen["OUTPUT_DIR"], seen["LEARNING_RATE"]) == ("7", "/mine", "0.2")


@pytest.mark.parametrize("text", list(REFUSED))
def test_a_dotenv_refused_by_one_reader_is_refused_by_all_in_the_same_line(tmp_path, monkeypatch, text):
    from app import sources
    from app.container.launch import read_env_file

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / ".env").write_text(text)
    monkeypatch.chdir(folder)  # every reader is given the file as `.env` in the submit folder
    line = f".env:{text.count(chr(10))}: {REFUSED[text]}"
    for reader in (sources.read_dotenv, read_env_file):
        with pytest.raises(UserError) as refused:
            reader(Path(".env"))
        assert str(refused.value) == line
    r = read_by_sbatch(folder)
    assert r.returncode == 2 and "start on" not in r.stdout, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {str(refused.value)}"], r.stderr


@pytest.mark.parametrize("setting, needle", [
    ({"ENV_FILE": "missing.env"}, "ENV_FILE=missing.env: no such file in "),
    ({"APP_PYTHON": "/nonexistent/.venv/bin/python", "APP_EXEC": ""}, "APP_PYTHON=/nonexistent/.venv/bin/python: no such program"),
])
def test_a_missing_env_file_or_venv_is_one_line_and_exit_2(tmp_path, setting, needle):
    folder = tmp_path / "project"
    folder.mkdir()
    r = read_by_sbatch(folder, **setting)
    assert r.returncode == 2 and "start on" not in r.stdout, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("slurm ? | error: ") and needle in line, line


def test_the_env_examples_build_ids_stay_out_of_the_jobs_environment(tmp_path):
    """`cp .env.example .env` (UID=, GID= for the image build): bash's UID is read-only, and exporting it
    printed "UID: readonly variable" in every task's log; the job runs as its submitter anyway."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(REPO / ".env.example", folder / ".env")
    assert "\nUID=" in (folder / ".env").read_text()
    r = read_by_sbatch(folder)
    assert r.returncode == 0 and "readonly" not in r.stderr, r.stderr
    assert environment_lines(r.stdout).get("GID") is None, r.stdout


def test_the_container_gets_the_jobs_settings_and_nothing_of_the_hosts(tmp_path):
    """`python -m app env --container`: the file the script hands to the runtime's --env-file."""
    environ = {"EPOCHS": "2", "WANDB_PROJECT": "team project", "SWEEP_CONFIG": "grid.yaml", "DATA_DIR": "/p/data",
               "CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_ID": "7", "PATH": "/host/bin", "HOME": "/root",
               "PYTHONPATH": "/host", "APP_PYTHON": "/p/.venv/bin/python", "APP_EXEC": "podman run x",
               "PIP_INDEX_URL": "http://mirror", "EDITOR": "vi", "WANDB_NOTES": "", "NETRC": "/root/.netrc",
               "DATA_DIR_HOST": "./data"}
    r = subprocess.run([sys.executable, "-m", "app", "env", "--container"], env=environ,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["CUDA_VISIBLE_DEVICES=1", "DATA_DIR=/p/data", "EPOCHS=2", "SLURM_JOB_ID=7",
                                     "SWEEP_CONFIG=grid.yaml", "WANDB_PROJECT=team project"], r.stdout
    r = subprocess.run([sys.executable, "-m", "app", "env", "--container"], capture_output=True, text=True,
                       env={"WANDB_NOTES": "two\nlines"}, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == ("error: WANDB_NOTES holds a line break: a container's "
                                                      "--env-file cannot carry it"), r.stderr


# --- the image under Slurm through podman -------------------------------------------------------------

PODMAN_LINE = re.compile(r"^APP_EXEC='(podman run [^']*)'$", re.M)


def podman_project(tmp_path: Path, data: Path, image: str, env_file: str, epochs: str) -> Path:
    """A submit folder for the image through podman, as deploy/slurm/README.md has it: its podman line
    (no GPU device here, the image under test), the grid without batch_size, the settings in `env_file`."""
    line = PODMAN_LINE.search((SCRIPT.parent / "README.md").read_text())[1]
    line = line.replace(" --device nvidia.com/gpu=all", "").replace("mnist-sweeps:latest", image)
    folder = tmp_path / "project"
    shutil.copytree(data, folder / "data")
    (folder / "grid.yaml").write_text(GRID_YAML.replace("  batch_size: {values: [32, 64]}\n", ""))
    settings = {"SWEEP_CONFIG": "grid.yaml", "WANDB_MODE": "offline", "DATASET": "mnist", "VAL_SIZE": "200",
                "EPOCHS": epochs, "WATCH_LOG": "none", "DEVICE": "cpu", "ALLOW_CPU": "true", "WANDB_SILENT": "true",
                "SWEEP_HEARTBEAT_S": "2", "TRAIN_STRIDE": "1"}
    (folder / env_file).write_text(f"APP_EXEC='{line}'\n" + "".join(f"{k}={v}\n" for k, v in settings.items()))
    return folder


def checkpointed_trial(folder: Path, timeout: float):
    """The sweep's study and a RUNNING trial whose run has checkpointed (the agent's pid is the container's,
    not the task's: no wait_mid_trial)."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"no trial reached a checkpoint\n{task_logs(folder)}"
        study = journal_study(folder)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if study else ():
            run_id = t.user_attrs.get("run_id")
            if run_id and (folder / "outputs" / run_id / "checkpoint.pt").exists():
                return study, t
        time.sleep(0.2)


def test_the_image_through_podman_stops_requeues_and_resumes(cluster, data, app_image, tmp_path, record_property):
    """deploy/slurm/README.md's podman line, as written but for the GPU device:
    settings from ENV_FILE with an exported variable winning, a relative SWEEP_CONFIG, files owned by the
    submitter; a stop mid-trial checkpoints through podman, the task requeues and the run resumes."""
    if shutil.which("podman") is None:
        unavailable("podman not found: apt-get install podman")
    t0 = time.monotonic()
    load_s = podman_image.load(app_image)  # waits for the load .ci/run started, if any
    line = PODMAN_LINE.search((SCRIPT.parent / "README.md").read_text())[1]
    for flag in ("--init", "--userns", "--device nvidia.com/gpu=all", "mnist-sweeps:latest",
                 "--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn)", "--ulimit nproc=4096:4096"):
        assert line.count(flag) == (0 if flag in ("--init", "--userns") else 1), (flag, line)
    # the tag the build makes (scripts/build-image's default)
    assert re.search(r"^tag=mnist-sweeps:latest$", (REPO / "scripts" / "build-image").read_text(), re.M)
    folder = podman_project(tmp_path, data, app_image, "team.env", epochs="5")
    (tmp_path / "jobtmp").mkdir()
    env = clean_env(tmp_path, **cluster.env, ENV_FILE="team.env", EPOCHS="2",  # exported: wins over the file
                    TMPDIR=str(tmp_path / "jobtmp"))
    job = submit(cluster, folder, env, "0")
    task = f"{job}_0"
    study, victim = checkpointed_trial(folder, 300)
    stop = subprocess.run(["scancel", "--signal=TERM", "--full", task], env={**env, **cluster.env},
                          capture_output=True, text=True, timeout=30)
    assert stop.returncode == 0, stop.stderr
    wait_done(cluster, job, folder, 420, [])
    trials = study.get_trials(deepcopy=False)
    logs = task_logs(folder)
    complete = check_every_point_trained_once(trials, victim, logs, points=2)
    mine = spans(folder)
    assert [s.restart for s in mine] == [0, 1] and [s.status for s in mine] == [143, 0], logs
    assert f"slurm {task} | SIGTERM: stopping the agent" in logs and f"slurm {task} | requeueing" in logs, logs
    runs = {r.run_id: r for r in (runlog.read(f) for f in runlog.find(folder / "runs"))}
    assert runs[victim.user_attrs["run_id"]].preempting and runs[victim.user_attrs["run_id"]].exit_code == 143
    for t in complete:  # EPOCHS exported at sbatch won over team.env's 5
        run = runs[t.user_attrs["run_id"]]
        assert run.exit_code == 0 and run.config["epochs"] == 2, run.config
    written = [p for p in (folder / "runs").rglob("*")] + [p for p in (folder / "outputs").rglob("*")]
    assert written and {p.lstat().st_uid for p in written} == {os.getuid()}  # the submitter's, not UID 1000
    assert not list((tmp_path / "jobtmp").iterdir())  # the settings file (it may hold the API key) is gone
    wall = time.monotonic() - t0
    figures = (f"slurm podman: 1 task, 1 stop -> 1 requeue -> resumed, {len(mine)} task runs, {len(trials)} trials, "
               f"2 of 2 grid points trained once, {wall:.0f} s (of which waiting for and loading the image into "
               f"podman {load_s:.0f} s)")
    record_property("slurm_podman", figures)
    print("\n" + figures)


def containers_of(folder: Path) -> list[str]:
    """podman's containers (running or not) that mount the project folder: this test's, whatever their name."""
    r = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}} {{.Mounts}}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if str(folder) in line]


def test_a_plain_scancel_of_a_podman_task_leaves_no_container(cluster, data, app_image, tmp_path, record_property):
    """A plain `scancel` of a task running the image through podman: podman's own forwarding of the
    SIGTERM fails and the container is no process of the task, so Slurm's kill never reaches it. The
    script stops, waits for and removes the container it named: nothing of it outlives the task, its
    trial is handed back (preempted) and the task submitted again finishes every point once."""
    if shutil.which("podman") is None:
        unavailable("podman not found: apt-get install podman")
    t0 = time.monotonic()
    podman_image.load(app_image)
    # the stop lands a fraction of a second after epoch 1's checkpoint (an epoch is about 1 s here): 4 epochs
    # still to go keep the trial mid-run, and the resubmitted task trains 9 epochs instead of 23
    folder = podman_project(tmp_path, data, app_image, ".env", epochs="5")
    env = clean_env(tmp_path, **cluster.env)
    job = submit(cluster, folder, env, "0")
    task = f"{job}_0"
    study, victim = checkpointed_trial(folder, 300)
    assert f":{task}:" in victim.user_attrs["agent"], victim.user_attrs  # agents in containers told apart
    assert cluster.run(["scancel", task]).returncode == 0
    wait_done(cluster, job, folder, 120, [])
    assert containers_of(folder) == [], task_logs(folder)  # none running, none stopped and kept
    stopped = study.get_trials(deepcopy=False)[victim.number]
    assert stopped.state == TrialState.FAIL and stopped.system_attrs["sweep_outcome"] == "preempted", task_logs(folder)
    again = submit(cluster, folder, env, "0")
    wait_done(cluster, again, folder, 420, [])
    trials = study.get_trials(deepcopy=False)
    logs = task_logs(folder)
    check_every_point_trained_once(trials, victim, logs, points=2)
    assert containers_of(folder) == [], logs
    wall = time.monotonic() - t0
    figures = f"slurm podman, plain scancel: 0 containers left, {len(trials)} trials, 2 of 2 points trained once, {wall:.0f} s"
    record_property("slurm_podman_scancel", figures)
    print("\n" + figures)
