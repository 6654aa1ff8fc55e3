"""Offline sweeps (Optuna, no W&B server): the W&B -> Optuna mapping, the coordination rules, and
real agent processes training on Fashion-MNIST against a journal file and a real PostgreSQL server.

The end-to-end tests start `python -m app offline-agent` processes, kill one with SIGKILL in the
middle of a trial and check that its trial is failed by another agent, rerun (resuming the dead run's
checkpoint) and completed, that no grid point completes twice, and that every trial is an offline W&B
run grouped under the sweep's name with its values in the config.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from cluster import postgres as postgres_cluster
from cluster import postgres_server
from conftest import REPO, clean_env, error_lines, run_app, saved_checkpoint, volume
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from app import runlog
from app.errors import UserError
from app.sweep.optuna import agent
from app.sweep.optuna import claims
from app.sweep.optuna import plan as osw
from app.sweep import spec as sweep_spec
from app.sweep.optuna import storage as sweep_storage


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def plan_for(tmp_path: Path, yaml: str, **env) -> osw.Plan:
    cfg = write_yaml(tmp_path / "sweep.yaml", yaml)
    return osw.plan({"SWEEP_CONFIG": str(cfg), "WANDB_DIR": str(tmp_path / "runs"), **env})


# ------------------------------------------------------------------------------------------
# mapping W&B parameters to Optuna
# ------------------------------------------------------------------------------------------

EVERY_FORM = """
method: random
metric: {name: val_loss, goal: minimize}
parameters:
  epochs: {value: 2}
  kernels: {values: [[8, 16], [16, 32]]}
  seed: {distribution: int_uniform, min: 0, max: 9}
  gpu_memory_fraction: {distribution: uniform, min: 0.1, max: 0.9}
  batch_size: {distribution: q_uniform, min: 30, max: 256, q: 32}
  learning_rate: {distribution: log_uniform_values, min: 0.0001, max: 0.1}
  val_size: {distribution: q_log_uniform_values, min: 100, max: 5000, q: 100}
  log_interval: {distribution: q_log_uniform_values, min: 1, max: 64, q: 1}
  watch_log_freq: {distribution: log_uniform, min: 2.0, max: 6.0, q: 1}
"""


def test_every_wandb_form_optuna_can_express_is_mapped(tmp_path):
    p = plan_for(tmp_path, EVERY_FORM.replace("log_uniform, min: 2.0, max: 6.0, q: 1",
                                              "q_log_uniform, min: 2.0, max: 6.0, q: 10"))
    dims = {d.name: d for d in p.space.dimensions}
    assert p.space.constants == {"epochs": 2}
    assert dims["kernels"].distribution == CategoricalDistribution(("[8, 16]", "[16, 32]"))
    assert dims["kernels"].apply("[16, 32]") == [16, 32]
    assert dims["seed"].distribution == IntDistribution(0, 9)
    assert dims["gpu_memory_fraction"].distribution == FloatDistribution(0.1, 0.9)
    # q_uniform: W&B returns multiples of q, so the multiples of 32 inside [30, 256]
    assert dims["batch_size"].distribution == IntDistribution(32, 256, step=32)
    assert dims["learning_rate"].distribution == FloatDistribution(0.0001, 0.1, log=True)
    # Optuna has no log + step: sample log-uniform, round to q when applied (W&B's definition)
    assert dims["val_size"].distribution == FloatDistribution(100, 5000, log=True)
    assert dims["val_size"].apply(1234.5) == 1200
    assert dims["log_interval"].distribution == IntDistribution(1, 64, log=True)
    # q_log_uniform: min and max are exponents
    wlf = dims["watch_log_freq"]
    assert wlf.distribution.log and math.isclose(wlf.distribution.low, math.exp(2)) and math.isclose(wlf.distribution.high, math.exp(6))
    assert wlf.apply(123.4) == 120 and isinstance(wlf.apply(123.4), int)

    # every sampled value is a valid training config
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        values = p.space.values({d.name: d.suggest(trial) for d in p.space.dimensions})
        config = p.base.replace(**values)
        assert config.batch_size % 32 == 0 and 32 <= config.batch_size <= 256
        assert 0.0001 <= config.learning_rate <= 0.1
        study.tell(trial, 0.0)


@pytest.mark.parametrize("param, needle", [
    ("learning_rate: {distribution: normal, mu: 0.01, sigma: 0.001}", "normal has no Optuna equivalent"),
    ("learning_rate: {distribution: inv_log_uniform_values, min: 0.001, max: 0.1}", "inv_log_uniform_values has no Optuna"),
    ("learning_rate: {distribution: beta, a: 1, b: 2}", "beta has no Optuna equivalent"),
    ("batch_size: {values: [32, 64], probabilities: [0.5, 0.5]}", "probabilities"),
    ("batch_size: {distribution: uniform, min: 16, max: 64.5}", "integer setting"),
    ("batch_size: {distribution: q_uniform, min: 33, max: 40, q: 32}", "no multiple of q=32"),
])
def test_forms_optuna_cannot_express_are_rejected_in_one_line(tmp_path, param, needle):
    yaml = f"method: random\nmetric: {{name: val_loss}}\nparameters:\n  {param}\n"
    with pytest.raises(sweep_spec.SweepSpecError) as err:
        plan_for(tmp_path, yaml)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_repository_sweeps_map_onto_optuna(tmp_path):
    env = {"WANDB_DIR": str(tmp_path)}
    grid = osw.plan({**env, "SWEEP_CONFIG": str(REPO / "sweeps/grid.yaml")})
    assert grid.grid_size == 6 and grid.goal == "maximize" and grid.metric == "val_accuracy"
    assert grid.storage_url == str(tmp_path / "sweeps" / "mnist-grid.journal")
    assert isinstance(sweep_storage.sampler(grid), optuna.samplers.GridSampler)
    rand = osw.plan({**env, "SWEEP_CONFIG": str(REPO / "sweeps/random.yaml")})
    assert isinstance(sweep_storage.sampler(rand), optuna.samplers.RandomSampler) and rand.spec.run_cap == 20
    bayes = osw.plan({**env, "SWEEP_CONFIG": str(REPO / "sweeps/bayes-hyperband.yaml")})
    assert isinstance(sweep_storage.sampler(bayes), optuna.samplers.TPESampler) and bayes.goal == "minimize"
    hb = sweep_storage.pruner(bayes)
    assert isinstance(hb, optuna.pruners.HyperbandPruner)
    # min_iter -> min_resource, eta -> reduction_factor, the sweep's constant epochs -> max_resource
    assert (hb._min_resource, hb._reduction_factor, hb._max_resource) == (1, 3, 9)


@pytest.mark.parametrize("env, needle", [
    ({"SWEEP_CONFIG": ""}, "needs SWEEP_CONFIG"),
    ({"WANDB_MODE": "online"}, "WANDB_MODE=online"),
    ({"SWEEP_STORAGE": "sqlite:///sweep.db"}, "not safe with several agents"),
    ({"SWEEP_STORAGE": "mysql://u:secret@db/x"}, "postgresql://"),
    ({"AGENT_COUNT": "0"}, "AGENT_COUNT='0' must be a positive integer"),
    ({"SWEEP_HEARTBEAT_S": "soon"}, "SWEEP_HEARTBEAT_S"),
    ({"EPOCHS": "0"}, "epochs=0"),
    ({"SWEEP_STORAGE": "postgresql://u:secret@127.0.0.1:9/x"}, "cannot open the database"),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, env, needle):
    base = {"SWEEP_CONFIG": str(REPO / "sweeps/grid.yaml"), "WANDB_DIR": str(tmp_path)}
    with pytest.raises(UserError) as err:
        agent.check_environment({**base, **env})
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "secret" not in str(err.value)  # a password in a URL never reaches a message


def test_cli_refuses_a_changed_sweep_with_exit_2(tmp_path):
    env = clean_env(tmp_path, WANDB_DIR=str(tmp_path / "runs"))
    cfg = write_yaml(tmp_path / "s.yaml", "name: s\nmethod: grid\nparameters:\n  learning_rate: {values: [0.1, 0.2]}\n")
    agent.check_environment({"SWEEP_CONFIG": str(cfg), "WANDB_DIR": str(tmp_path / "runs")})  # creates the study
    cfg.write_text("name: s\nmethod: grid\nparameters:\n  learning_rate: {values: [0.1, 0.3]}\n")
    proc = run_app(["offline-agent", "--config", str(cfg)], env, tmp_path)
    assert proc.returncode == 2
    assert len(error_lines(proc.stderr)) == 1 and "different config" in proc.stderr, proc.stderr


def _journal_with_trials(journal: Path, cfg: Path, values: list[float]) -> None:
    """A sweep in `journal` whose trials finished with these metric values, as agents record them."""
    p = osw.plan({"SWEEP_CONFIG": str(cfg), "SWEEP_STORAGE": str(journal)})
    study = sweep_storage.open_study(p)
    for i, value in enumerate(values):
        trial = study.ask()
        trial.set_user_attr("values", p.space.values({d.name: d.suggest(trial) for d in p.space.dimensions}))
        trial.set_user_attr("run_id", f"run{i}")
        study.tell(trial, value)


def test_sweep_status_reads_the_storage_from_dotenv_and_the_environment_wins(tmp_path):
    """sweep-status takes SWEEP_STORAGE from .env in the current folder, as train reads .env."""
    cfg = write_yaml(tmp_path / "s.yaml", "name: s\nmethod: random\nparameters:\n  learning_rate: {values: [0.1, 0.2]}\n")
    _journal_with_trials(tmp_path / "shared" / "in-dotenv.journal", cfg, [0.5, 0.4])
    _journal_with_trials(tmp_path / "shared" / "in-environment.journal", cfg, [0.3, 0.2, 0.1])
    (tmp_path / ".env").write_text(f"SWEEP_STORAGE={tmp_path / 'shared' / 'in-dotenv.journal'}\n")
    env = clean_env(tmp_path, WANDB_DIR=str(tmp_path / "runs"))  # no sweeps/ there: only .env names the sweep
    status = run_app(["sweep-status"], env, tmp_path)
    assert status.returncode == 0, status.stderr
    assert "sweep s: random" in status.stdout and "2 complete" in status.stdout, status.stdout
    env["SWEEP_STORAGE"] = str(tmp_path / "shared" / "in-environment.journal")
    status = run_app(["sweep-status"], env, tmp_path)
    assert status.returncode == 0 and "3 complete" in status.stdout, status.stdout + status.stderr
    # .env is checked as train checks it: a typo is one line naming the file and line
    (tmp_path / ".env").write_text("SWEEP_STORGE=x\n")
    status = run_app(["sweep-status"], env, tmp_path)
    assert status.returncode == 2 and error_lines(status.stderr) == [
        "error: .env:1: unknown setting SWEEP_STORGE; did you mean SWEEP_STORAGE?"], status.stderr


# ------------------------------------------------------------------------------------------
# the coordination rules, on real Optuna trials
# ------------------------------------------------------------------------------------------

def _trial(number: int, state: TrialState, key: str, **attrs) -> optuna.trial.FrozenTrial:
    t = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                     params={"learning_rate": 0.1}, distributions={"learning_rate": FloatDistribution(0.01, 1)},
                     system_attrs={"sweep_key": key, **attrs})
    t.number = number
    return t


def test_only_the_lowest_numbered_live_trial_of_a_key_trains():
    W, R, C, F = TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL
    trials = [_trial(0, F, "grid-0", sweep_outcome="stale"), _trial(1, W, "grid-0"), _trial(2, R, "grid-0"),
              _trial(3, C, "grid-1"), _trial(4, R, "grid-1"), _trial(5, R, "grid-2"),
              _trial(6, F, "grid-3", sweep_outcome="duplicate")]
    ledger = claims.Ledger(trials, grid=True, grid_size=4, run_cap=None)
    assert ledger.verdict(trials[2]) == "duplicate"  # trial 1 is queued for the same point
    assert ledger.verdict(trials[1]) is None  # the retry of the dead trial 0
    assert ledger.verdict(trials[4]) == "duplicate"  # grid-1 is already complete
    assert ledger.verdict(trials[5]) is None
    assert ledger.untouched_grid_keys() == ["grid-3"]  # a void duplicate doesn't cover its point
    assert ledger.needs_retry() == ["grid-3"]  # and GridSampler won't pick it again: it is queued
    assert not ledger.finished() and ledger.work_available()
    # a point that died MAX_STALE times is given up, not retried forever
    dead = [_trial(i, F, "grid-0", sweep_outcome="stale") for i in range(claims.MAX_STALE)]
    assert claims.Ledger(dead, True, 1, None).finished()
    assert claims.Ledger(dead[:-1], True, 1, None).needs_retry() == ["grid-0"]


def test_run_cap_counts_distinct_trials_and_lets_retries_through():
    R, F = TrialState.RUNNING, TrialState.FAIL
    trials = [_trial(0, F, "trial-0", sweep_outcome="stale"), _trial(1, R, "trial-1"),
              _trial(2, R, "trial-2"), _trial(3, R, "trial-0")]
    ledger = claims.Ledger(trials, grid=False, grid_size=None, run_cap=2)
    assert ledger.verdict(trials[1]) is None
    assert ledger.verdict(trials[2]) == "capped"  # trials 0 and 1 already hold both places
    assert ledger.verdict(trials[3]) is None  # a retry of trial 0 holds its old place
    assert ledger.cap_reached()
    assert ledger.needs_retry() == []  # trial 0's retry (trial 3) is already live


def test_a_dead_heartbeat_is_seen_on_the_observers_clock():
    watch = claims.StaleWatch(interval=0.05)
    alive = _trial(0, TrialState.RUNNING, "grid-0", heartbeat=1.0)
    alive._trial_id = 10
    assert watch.stale([alive], mine=set()) == []
    time.sleep(0.25)
    assert watch.stale([alive], mine=set()) == [alive]  # unchanged for more than 4 beats
    assert watch.stale([alive], mine={10}) == []  # never our own trial
    beating = _trial(0, TrialState.RUNNING, "grid-0", heartbeat=2.0)
    beating._trial_id = 10
    assert watch.stale([beating], mine=set()) == []


# ------------------------------------------------------------------------------------------
# real agents on real data
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(fashion_dir, tmp_path_factory) -> Path:
    """Fashion-MNIST unpacked before the agents start (several agents unpacking one DATA_DIR at once race)."""
    from app import data

    root = tmp_path_factory.mktemp("sweep-data")
    shutil.copytree(fashion_dir / "FashionMNIST", root / "FashionMNIST")
    data.ensure("fashion_mnist", root)
    return root


GRID = """name: {name}
method: grid
metric: {{name: val_accuracy, goal: maximize}}
parameters:
  learning_rate: {{values: [0.003, 0.03]}}
  kernels: {{values: [[4, 8], [8, 16]]}}
"""


def agent_env(tmp: Path, data: Path, **extra) -> dict[str, str]:
    settings = dict(DATASET="fashion_mnist", DATA_DIR=str(data), EPOCHS="2", TRAIN_STRIDE="50", VAL_SIZE="1000",
                    LOG_INTERVAL="3", WATCH_LOG="none", DEVICE="cpu", WANDB_MODE="offline", WANDB_SILENT="true",
                    WANDB_DIR=str(tmp / "runs"), OUTPUT_DIR=str(tmp / "outputs"), SWEEP_HEARTBEAT_S="1",
                    OMP_NUM_THREADS="1")  # three agents on two cores: one thread each
    return clean_env(tmp, **{**settings, **extra})


def start_agent(env: dict, cwd: Path, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app", "offline-agent", *args], env=env, cwd=cwd,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def logs(folder: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-4000:]}" for f in sorted(folder.glob("agent-*.log")))


def wait_all(procs, folder: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"agents still running after {timeout} s\n{logs(folder)}")
    return codes


def load_study(storage_url: str, name: str):
    return optuna.load_study(study_name=name, storage=sweep_storage.open_storage(storage_url))


def wait_for_trial_mid_training(study, agent: subprocess.Popen, outputs: Path, folder: Path, timeout: float = 240):
    """A RUNNING trial of `agent` that has checkpointed its first epoch."""
    pid = agent.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agent.poll() is None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            run_id = t.user_attrs.get("run_id")
            if t.user_attrs.get("agent", "").endswith(f":{pid}") and run_id and (outputs / run_id / "checkpoint.pt").exists():
                return t
        time.sleep(0.2)
    pytest.fail(f"agent {pid} never got mid-trial (exit status {agent.poll()})\n{logs(folder)}")


def one_point_mid_trial(tmp_path: Path, data_dir: Path, metric: str, early_terminate: str = "", **settings):
    """An offline agent on a one-point grid (learning_rate 0.01, metric `metric`), started and caught
    mid-trial: (its environment, the agent, its study, the RUNNING trial with an epoch checkpointed)."""
    cfg = write_yaml(tmp_path / "one.yaml", f"name: one\nmethod: grid\nmetric: {metric}\n{early_terminate}"
                                            "parameters:\n  learning_rate: {values: [0.01]}\n")
    env = agent_env(tmp_path, data_dir, SWEEP_CONFIG=str(cfg), **settings)
    agent = start_agent(env, tmp_path, tmp_path / "agent-0.log")
    study = None
    while study is None and agent.poll() is None:
        try:
            study = load_study(osw.storage_url(env, "one"), "one")
        except (KeyError, ValueError, UserError):  # the agent has not created it yet
            time.sleep(0.2)
    return env, agent, study, wait_for_trial_mid_training(study, agent, tmp_path / "outputs", tmp_path)


def check_sweep(study, grid_size: int, runs_root: Path, name: str) -> dict:
    """No grid point completed twice, every point completed, and each trial is a grouped offline run."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    keys = [t.system_attrs["sweep_key"] for t in complete]
    assert sorted(keys) == sorted(f"grid-{i}" for i in range(grid_size)), [(t.number, t.state, t.system_attrs) for t in trials]
    runs = {r.run_id: r for r in (runlog.read(f) for f in runlog.find(runs_root))}
    finished = [r for r in runs.values() if r.finished]
    assert len(finished) == grid_size  # the killed run has no exit record; nothing else ran
    for t in complete:
        run = runs[t.user_attrs["run_id"]]
        assert run.group == name and run.exit_code == 0
        values = t.user_attrs["values"]
        assert run.config["learning_rate"] == values["learning_rate"]
        assert run.config["kernels"] == values["kernels"]
        assert math.isclose(run.summary["val_accuracy"], t.value)
        tags = next(rec.run.tags for rec in runlog.records(next(run.path.glob("run-*.wandb")))
                    if rec.WhichOneof("record_type") == "run")
        assert list(tags) == ["offline-sweep"]
        assert not [p for p in run.path.rglob("*") if p.is_symlink()]  # self-contained: copyable anywhere
    return runs


def kill_mid_trial_and_finish(tmp_path: Path, data: Path, storage: str, n_agents: int) -> dict:
    """Start agents, SIGKILL one mid-trial, let the others finish; returns measurements."""
    name = tmp_path.name.replace("_", "-")[:40]
    cfg = write_yaml(tmp_path / "grid.yaml", GRID.format(name=name))
    env = agent_env(tmp_path, data, SWEEP_CONFIG=str(cfg), SWEEP_STORAGE=storage)
    study_url = osw.storage_url(env, name)
    procs = [start_agent(env, tmp_path, tmp_path / f"agent-{i}.log") for i in range(n_agents)]
    study = None
    while study is None:
        try:
            study = load_study(study_url, name)
        except (KeyError, ValueError):
            time.sleep(0.2)
    victim = procs[0]
    trial = wait_for_trial_mid_training(study, victim, tmp_path / "outputs", tmp_path)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    codes = wait_all(procs[1:], tmp_path, timeout=600)
    assert victim.wait() == -signal.SIGKILL
    assert codes == [0] * (n_agents - 1), logs(tmp_path)

    trials = study.get_trials(deepcopy=False)
    dead = trials[trial.number]
    assert dead.state == TrialState.FAIL and dead.system_attrs["sweep_outcome"] == "stale"
    retries = [t for t in trials if t.system_attrs.get("retry_of") == trial.number]
    # agents that find the dead trial at the same moment may each queue a retry: the lowest-numbered one
    # trains, the others are dropped as duplicates before training (app.sweep.optuna.claims's rule)
    retry = [t for t in retries if t.state == TrialState.COMPLETE]
    extra = [t for t in retries if t not in retry]
    assert len(retry) == 1 and all(t.state == TrialState.FAIL and t.system_attrs.get("sweep_outcome") == "duplicate"
                                   and t.number > retry[0].number for t in extra), \
        [(t.number, t.state, t.system_attrs) for t in trials]
    assert retry[0].params == dead.params and retry[0].user_attrs["resume_run"] == dead.user_attrs["run_id"]
    runs = check_sweep(study, 4, tmp_path / "runs", name)
    # the retry resumed the dead run's checkpoint (killed in test or export: straight to test, no epoch again)
    import torch

    done = torch.load(tmp_path / "outputs" / dead.user_attrs["run_id"] / "checkpoint.pt", weights_only=False)["epoch"]
    resumed = runs[retry[0].user_attrs["run_id"]]
    assert [row["epoch"] for row in resumed.history if "val_loss" in row] == list(range(done, 2))
    # the killed run has no exit record (kill -9 may even leave its log empty: W&B had written nothing yet)
    killed = next(f for f in runlog.find(tmp_path / "runs") if f.name.endswith(dead.user_attrs["run_id"]))
    assert not runlog.read(killed).finished
    return {
        "trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "duplicates": len([t for t in trials if t.system_attrs.get("sweep_outcome") == "duplicate"]),
        "recovered_s": (retry[0].datetime_complete.timestamp() - killed_at),
        "retry_started_s": (retry[0].datetime_start.timestamp() - killed_at),
        "study": study, "env": env, "cfg": cfg, "name": name,
    }


@pytest.mark.slow
def test_three_agents_survive_a_kill_and_a_restart_continues(tmp_path, data_dir, record_property):
    name = tmp_path.name.replace("_", "-")[:40]
    cfg = write_yaml(tmp_path / "grid.yaml", GRID.format(name=name))
    env = agent_env(tmp_path, data_dir, SWEEP_CONFIG=str(cfg))
    # one agent does one trial and stops: the sweep is now part done, as after `docker compose down`
    first = run_app(["offline-agent", "--count", "1"], env, tmp_path, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "ran 1 trial(s)" in first.stdout

    result = kill_mid_trial_and_finish(tmp_path, data_dir, "", n_agents=3)
    study = result["study"]
    assert study.trials[0].state == TrialState.COMPLETE  # the first agent's trial was kept, not redone
    for key in ("trials", "complete", "duplicates", "recovered_s", "retry_started_s"):
        record_property(key, result[key])
    print(f"journal: {result['trials']} trials, {result['complete']} complete, {result['duplicates']} duplicates, "
          f"retry started {result['retry_started_s']:.1f} s and completed {result['recovered_s']:.1f} s after the kill")

    # an agent started on a finished sweep trains nothing
    again = run_app(["offline-agent"], env, tmp_path, timeout=120)
    assert again.returncode == 0 and "is done" in again.stdout, again.stdout[-2000:]
    assert len(load_study(osw.storage_url(env, name), name).trials) == result["trials"]

    status = run_app(["sweep-status", "--config", str(cfg)], env, tmp_path)
    assert status.returncode == 0, status.stderr
    assert "4 of 4 grid points done" in status.stdout and "best: trial" in status.stdout
    assert "DIED" in status.stdout  # the killed attempt is visible, not hidden


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL 15 on loopback (tests/cluster.py), run as an unprivileged user under root."""
    with postgres_server() as url:
        yield url


def test_agents_opening_a_new_database_together_all_get_it(postgres, tmp_path):
    """Agents started together on an empty database each create Optuna's tables: all must succeed
    (PostgreSQL refuses a second concurrent CREATE of the same table with a unique violation)."""
    import sqlalchemy

    server = postgres.replace("postgresql://", "postgresql+psycopg2://")  # as plan.storage_url passes it
    engine = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    env = clean_env(tmp_path)
    failed = []
    for round_ in range(3):
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE fresh_{round_}"))
        go = tmp_path / f"go-{round_}"
        code = ("import os, sys, time\n"
                "from app.sweep.optuna import storage as sweep_storage\n"
                f"while not os.path.exists({str(go)!r}): time.sleep(0.002)\n"
                f"sweep_storage.open_storage({server.rsplit('/', 1)[0] + f'/fresh_{round_}'!r})\n")
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
                 for _ in range(8)]
        time.sleep(4)  # every process has imported optuna and waits for the word
        go.write_text("")
        failed += [p.stderr.read()[-300:] for p in procs if p.wait(timeout=120) != 0]
    engine.dispose()
    assert not failed, failed


@pytest.mark.slow
def test_agents_on_postgresql_survive_a_kill(tmp_path, data_dir, postgres, record_property):
    result = kill_mid_trial_and_finish(tmp_path, data_dir, postgres, n_agents=2)
    for key in ("trials", "complete", "duplicates", "recovered_s", "retry_started_s"):
        record_property(key, result[key])
    print(f"postgresql: {result['trials']} trials, {result['complete']} complete, {result['duplicates']} duplicates, "
          f"retry started {result['retry_started_s']:.1f} s and completed {result['recovered_s']:.1f} s after the kill")
    status = run_app(["sweep-status", "--config", str(result["cfg"])], result["env"], tmp_path)
    assert status.returncode == 0 and "4 of 4 grid points done" in status.stdout, status.stdout + status.stderr


@pytest.mark.slow
@pytest.mark.parametrize("epochs, early_terminate", [
    (2, ""),
    # Hyperband reports every epoch to the database; min_iter = epochs: no rung before the last, never pruned
    (3, "early_terminate: {type: hyperband, min_iter: 3, eta: 2}\n"),
], ids=["plain", "hyperband"])
def test_a_database_gone_mid_trial_ends_the_agent_in_one_line_and_the_trial_is_rerun(tmp_path, data_dir, epochs,
                                                                                    early_terminate):
    """PostgreSQL goes away while a trial trains: the trial trains to its end and keeps its checkpoint, the
    agent ends with one line naming the storage and exit 1, and nothing is told to Optuna; once the database
    is back the trial (still RUNNING) is seen dead and handed out again, and its retry records the W&B run
    that already ran to its end instead of training a second one."""
    with postgres_cluster() as server:
        env, agent, study, trial = one_point_mid_trial(tmp_path, data_dir, "{name: val_accuracy, goal: maximize}",
                                                       early_terminate, SWEEP_STORAGE=server.url, EPOCHS=str(epochs))
        server.stop()  # connections reset, new ones refused at once
        assert agent.wait(timeout=300) == 1, logs(tmp_path)
        out = (tmp_path / "agent-0.log").read_text()
        assert "Traceback" not in out, out[-4000:]
        (line,) = error_lines(out)
        assert line.startswith(f"error: SWEEP_STORAGE={osw.redact(osw.storage_url(env, 'one'))}: the database stopped "
                               "answering (") and f"trial {trial.number} stays RUNNING" in line, line
        assert out.count("heartbeat:") == 1, out[-4000:]  # said once, not every beat
        run_id = trial.user_attrs["run_id"]
        assert saved_checkpoint(tmp_path / "outputs" / run_id / "checkpoint.pt")["epoch"] == epochs  # trained to its end
        assert runlog.read(next(f for f in runlog.find(tmp_path / "runs") if f.name.endswith(run_id))).exit_code == 0

        server.start()
        left = study.trials[trial.number]
        assert left.state == TrialState.RUNNING and left.value is None  # nothing recorded as done
        again = run_app(["offline-agent"], env, tmp_path, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        first = runlog.read(next(f for f in runlog.find(tmp_path / "runs") if f.name.endswith(run_id)))
        assert (f"W&B run {run_id} of the attempt before ran to its end (val_accuracy "
                f"{first.summary['val_accuracy']:.4f}) but was never recorded; recorded from it, not trained again"
                in again.stdout), again.stdout[-3000:]
        trials = study.trials
        assert trials[trial.number].state == TrialState.FAIL and trials[trial.number].system_attrs["sweep_outcome"] == "stale"
        (done,) = [t for t in trials if t.state == TrialState.COMPLETE]
        assert done.system_attrs["retry_of"] == trial.number
        assert done.user_attrs["run_id"] == run_id and done.value == first.summary["val_accuracy"]
        assert len(runlog.find(tmp_path / "runs")) == 1  # one W&B run for the grid point: no second one trained


def remount(path: Path, mode: str) -> None:
    """ro or rw; the kernel refuses ro (busy) while a file is open for writing: an append in flight."""
    for _ in range(100):
        if subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(0.05)
    pytest.fail(f"could not remount {path} {mode}")


@pytest.mark.slow
def test_a_journal_that_turns_read_only_mid_trial_ends_the_agent_in_one_line_and_nothing_is_lost(tmp_path, data_dir):
    """The journal's volume turns read-only while a trial trains (as a file system does after I/O errors):
    training goes on to its end, the agent ends with one line naming the journal and exit 1, the journal
    stays whole; once it is writable the trial is handed out again and its finished run recorded."""
    with volume(tmp_path / "volume") as vol:
        journal = vol / "one.journal"
        env, agent, study, trial = one_point_mid_trial(tmp_path, data_dir, "{name: val_accuracy, goal: maximize}",
                                                       SWEEP_STORAGE=str(journal))
        remount(vol, "ro")
        before = journal.read_bytes()
        assert agent.wait(timeout=300) == 1, logs(tmp_path)
        out = (tmp_path / "agent-0.log").read_text()
        assert "Traceback" not in out, out[-4000:]
        (line,) = error_lines(out)
        assert line.startswith(f"error: sweep storage {journal}: the journal could not be written (Read-only file "
                               f"system); trial {trial.number} stays RUNNING there"), line
        assert out.count("heartbeat: the sweep journal cannot be written (Read-only file system)") == 1, out[-4000:]
        assert journal.read_bytes() == before  # not a byte written, half-written or lost
        run_id = trial.user_attrs["run_id"]
        assert runlog.read(next(f for f in runlog.find(tmp_path / "runs") if f.name.endswith(run_id))).exit_code == 0

        remount(vol, "rw")
        again = run_app(["offline-agent"], env, tmp_path, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"W&B run {run_id} of the attempt before ran to its end" in again.stdout, again.stdout[-3000:]
        study = load_study(str(journal), "one")
        (done,) = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert done.system_attrs["retry_of"] == trial.number and done.user_attrs["run_id"] == run_id


@pytest.mark.slow
def test_bayes_hyperband_with_a_run_cap(tmp_path, data_dir):
    """TPE + Hyperband: exactly run_cap distinct trials, each reporting every epoch it trained."""
    cfg = write_yaml(tmp_path / "bayes.yaml", """name: hb
method: bayes
run_cap: 3
metric: {name: val_loss, goal: minimize}
early_terminate: {type: hyperband, min_iter: 1, eta: 2}
parameters:
  learning_rate: {distribution: log_uniform_values, min: 0.001, max: 0.05}
  batch_size: {distribution: q_uniform, min: 64, max: 256, q: 64}
""")
    env = agent_env(tmp_path, data_dir, SWEEP_CONFIG=str(cfg))
    procs = [start_agent(env, tmp_path, tmp_path / f"agent-{i}.log") for i in range(2)]
    assert wait_all(procs, tmp_path, timeout=400) == [0, 0], logs(tmp_path)
    study = load_study(osw.storage_url(env, "hb"), "hb")
    trained = [t for t in study.trials if claims.outcome(t) != "void"]
    assert len(trained) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trained)
    for t in trained:
        assert t.user_attrs["values"]["batch_size"] in (64, 128, 192, 256)
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
        assert len(t.intermediate_values) >= 1
    assert len({json.dumps(t.params, sort_keys=True) for t in trained}) == 3


@pytest.mark.slow
def test_a_stopped_agent_checkpoints_and_its_trial_resumes(tmp_path, data_dir):
    """SIGTERM (docker stop): the trial is marked preempted at once; the next agent resumes its checkpoint."""
    env, agent, study, trial = one_point_mid_trial(tmp_path, data_dir, "{name: val_loss}", EPOCHS="3")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=120) == 128 + signal.SIGTERM, logs(tmp_path)
    stopped = study.trials[trial.number]
    assert stopped.state == TrialState.FAIL and stopped.system_attrs["sweep_outcome"] == "preempted"

    again = run_app(["offline-agent"], env, tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resuming from run {stopped.user_attrs['run_id']}'s checkpoint" in again.stdout
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 1 and done[0].system_attrs["retry_of"] == trial.number


@pytest.mark.slow
def test_a_retry_stopped_before_its_run_opened_does_not_break_the_resume_chain(tmp_path, data_dir):
    """Attempt 1 checkpoints and is stopped; attempt 2 is stopped before it opened its run (a short
    `--time`: it has a run id but no checkpoint of its own); attempt 3 resumes attempt 1's checkpoint."""
    env, agent, study, trial = one_point_mid_trial(tmp_path, data_dir, "{name: val_loss}", EPOCHS="3")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=120) == 128 + signal.SIGTERM, logs(tmp_path)
    first = study.trials[trial.number]
    assert first.system_attrs["sweep_outcome"] == "preempted"
    assert [t.number for t in study.trials if t.state == TrialState.WAITING] == []  # the next agent queues the retry
    # what the stopped second attempt left in the sweep: a preempted trial with its run id, nothing in outputs/
    second_run = "stopped0"
    study.add_trial(create_trial(
        state=TrialState.FAIL, params=first.params, distributions=first.distributions,
        system_attrs={**{k: first.system_attrs[k] for k in ("sweep_key", "grid_id", "search_space") if k in first.system_attrs},
                      "retry_of": first.number, "attempt": 2, "sweep_outcome": "preempted"},
        user_attrs={"run_id": second_run, "resume_run": first.user_attrs["run_id"], "values": first.user_attrs["values"]}))
    assert not (tmp_path / "outputs" / second_run).exists()

    again = run_app(["offline-agent"], env, tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    (done,) = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done.system_attrs["attempt"] == 3 and done.user_attrs["resume_run"] == second_run
    assert f"resuming from run {first.user_attrs['run_id']}'s checkpoint" in again.stdout, again.stdout[-3000:]
    retry = runlog.read(next(f for f in runlog.find(tmp_path / "runs") if f.name.endswith(done.user_attrs["run_id"])))
    trained = [row["epoch"] for row in retry.history if "val_loss" in row]
    assert trained and trained[0] >= 1, trained  # epoch 1 (index 0) was not trained again


@pytest.mark.slow
def test_a_trial_stopped_in_test_or_export_resumes_without_training_again(tmp_path, data_dir):
    """SIGTERM after the last epoch's checkpoint, during test/export: the retry trains no epoch, goes
    straight to test and export, and tells Optuna the val metric the last epoch measured."""
    env, agent, study, trial = one_point_mid_trial(tmp_path, data_dir, "{name: val_accuracy, goal: maximize}", EPOCHS="2")
    dead_dir = tmp_path / "outputs" / trial.user_attrs["run_id"]
    deadline = time.monotonic() + 240
    while (saved_checkpoint(dead_dir / "checkpoint.pt") or {}).get("epoch") != 2:  # the last epoch is done
        assert agent.poll() is None and time.monotonic() < deadline, logs(tmp_path)
        time.sleep(0.01)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=120) == 128 + signal.SIGTERM, logs(tmp_path)
    assert not (dead_dir / "model.onnx").exists(), "the stop came after the export: the trial had finished"
    stopped = study.trials[trial.number]
    assert stopped.state == TrialState.FAIL and stopped.system_attrs["sweep_outcome"] == "preempted"
    runs = {r.run_id: r for r in (runlog.read(f) for f in runlog.find(tmp_path / "runs"))}
    measured = [row["val_accuracy"] for row in runs[stopped.user_attrs["run_id"]].history if "val_accuracy" in row]
    assert len(measured) == 2

    again = run_app(["offline-agent"], env, tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resuming from run {stopped.user_attrs['run_id']}'s checkpoint after epoch 2" in again.stdout
    (done,) = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done.system_attrs["retry_of"] == trial.number
    assert done.value == measured[-1]
    retry = runlog.read(next(f for f in runlog.find(tmp_path / "runs") if f.name.endswith(done.user_attrs["run_id"])))
    assert retry.exit_code == 0
    assert [row for row in retry.history if "val_accuracy" in row or "loss" in row] == []  # no epoch trained again
    assert retry.summary["val_accuracy"] == measured[-1] and 0 < retry.summary["test_accuracy"] <= 1
    assert (tmp_path / "outputs" / done.user_attrs["run_id"] / "model.onnx").exists()


DIVERGING = [1e12, 1e13, 1e14]  # NaN by the second step on tests/idx.py's images (tests/test_train.py)


def test_diverged_trials_are_results_and_the_agent_goes_on(tmp_path, small_data):
    """Three grid points whose learning rate diverges, one that trains: one agent trains all four. Each
    diverged trial stops at its first NaN loss, is told to the study as COMPLETE with the metric at its
    worst (-inf: the goal is maximize) and counts as no failure (three failures in a row would stop the
    agent); sweep-status shows them as DIVERGED, apart from the best."""
    from app.sweep.optuna import trial as sweep_trial

    lrs = ", ".join(map(str, [*DIVERGING, 0.01]))
    cfg = write_yaml(tmp_path / "div.yaml", "name: div\nmethod: grid\nmetric: {name: val_accuracy, goal: maximize}\n"
                                            f"parameters:\n  learning_rate: {{values: [{lrs}]}}\n")
    env = agent_env(tmp_path, small_data, SWEEP_CONFIG=str(cfg), DATASET="mnist", TRAIN_STRIDE="1", VAL_SIZE="200",
                    BATCH_SIZE="32", LOG_INTERVAL="2")
    proc = run_app(["offline-agent"], env, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "sweep div is done (4 trials)" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-4000:]

    study = load_study(osw.storage_url(env, "div"), "div")
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    diverged = [t for t in study.trials if t.system_attrs.get("sweep_outcome") == "diverged"]
    assert sorted(t.user_attrs["values"]["learning_rate"] for t in diverged) == DIVERGING
    assert all(t.value == -math.inf for t in diverged)
    runs = {r.run_id: r for r in (runlog.read(f) for f in runlog.find(tmp_path / "runs"))}
    for t in diverged:
        run_id = t.user_attrs["run_id"]
        assert f"trial {t.number} diverged: loss " in proc.stdout
        assert runs[run_id].exit_code == 0 and runs[run_id].summary["diverged"] is True
        assert not [p.name for p in (tmp_path / "outputs" / run_id).iterdir() if p.name != "checkpoint.pt"]
        # a retry of that trial (its agent gone before telling the study) records the run as diverged too,
        # never as complete with the metric of an epoch from before it diverged
        retry = type("Retry", (), {"user_attrs": {"resume_run": run_id}})()
        assert sweep_trial._finished_run(tmp_path / "runs", retry, t.user_attrs["values"], "val_accuracy")[1:] == \
            ("diverged", None)
    [good] = [t for t in study.trials if t not in diverged]
    assert 0 < good.value <= 1 and (tmp_path / "outputs" / good.user_attrs["run_id"] / "model.onnx").is_file()

    status = run_app(["sweep-status", "--config", str(cfg)], env, tmp_path)
    assert status.returncode == 0, status.stderr
    rows = {cells[0]: cells for cells in map(str.split, status.stdout.splitlines()[2:6])}  # the table's 4 rows
    assert sorted(int(n) for n, row in rows.items() if row[1] == "DIVERGED") == sorted(t.number for t in diverged), \
        status.stdout
    assert rows[str(good.number)][1] == "COMPLETE"
    assert "1 complete, 3 diverged; 4 of 4 grid points done" in status.stdout or \
        "3 diverged, 1 complete; 4 of 4 grid points done" in status.stdout, status.stdout
    assert f"best: trial {good.number} val_accuracy {good.value:.4f}" in status.stdout
    listed = json.loads(run_app(["sweep-status", "--config", str(cfg), "--json"], env, tmp_path).stdout)[0]
    assert sorted((r["state"], r["value"] is None) for r in listed["trials"]) == \
        [("COMPLETE", False)] + [("DIVERGED", True)] * 3  # JSON has no -inf: null
    assert listed["best"]["trial"] == good.number

    # the small venv beside an image (deploy/slurm/README.md: the package, its settings reader and optuna;
    # no torch, W&B, onnx): the same table, and the retrain command from the swept values
    small = subprocess.run([sys.executable, "-c", SMALL_VENV, "sweep-status", "--config", str(cfg)], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert small.returncode == 0 and small.stdout.startswith(status.stdout.split("\nbest: ")[0]), small.stderr[-2000:]
    assert "(W&B is not installed here to read its run folder: settings not swept come from .env" in small.stdout


# `python -m app` as in a venv with only what deploy/slurm/README.md installs beside an image
SMALL_VENV = ("import sys; sys.modules.update(dict.fromkeys(('torch', 'torchvision', 'wandb', 'onnx', 'onnxruntime', "
              "'docker'))); from app.cli import main; sys.exit(main(sys.argv[1:]))")


WRITER = r"""
import sys
from app.sweep.optuna import storage as sweep_storage
storage = sweep_storage.open_storage(sys.argv[1])
sid = storage.get_study_id_from_name("journal-race")
for i in range(40):
    storage.set_study_user_attr(sid, f"{sys.argv[2]}-{i}", i)
"""


def test_writers_sharing_a_journal_never_write_behind_a_crashed_append(tmp_path):
    """Four processes append while crashed appends (partial lines, written under the lock as a dying
    writer leaves them) keep landing at the end: every later append cuts the partial line first, so the
    journal stays whole and every attribute is there."""
    from app.sweep.optuna import journal

    path = tmp_path / "race.journal"
    optuna.create_study(study_name="journal-race", storage=sweep_storage.open_storage(str(path)))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{k}"], cwd=REPO) for k in range(4)]
    crashes = 0
    while any(p.poll() is None for p in procs) or crashes < 3:
        with journal.locked(path):
            with open(path, "ab") as f:
                f.write(b'{"op_code": 7, "study_id": 0, "user_attr": {"cut sh')
        crashes += 1
        time.sleep(0.05)
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    assert journal.scan(path).bad == []
    attrs = sweep_storage.load_study(str(path), "journal-race").user_attrs
    assert {f"w{k}-{i}" for k in range(4) for i in range(40)} <= set(attrs)
