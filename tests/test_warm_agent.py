"""The warm W&B-sweep agent (AGENT_PROCESS=warm) against the stand-in W&B API, with the real wandb library:
every run handed out is a whole run with the same content a `wandb agent` child process records; a
stop checkpoints and exits 143; a failing run fails alone; a server that goes away (a closed port, or a
silent one) is one line and exit 1 within AGENT_OUTAGE_S, the running run checkpointed. Natively (the entrypoint's agent mode, no
Docker): the container tests cover the image's wiring of the same entrypoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env, wait_for
from fake_wandb import FakeWandb

from app import artifact, checkpoint, runlog
from app.sweep.wandb import best, server, supervisor, warm_agent

COMMAND = ["${env}", "${interpreter}", "-m", "app", "train", "${args}"]


def grid(**values: list) -> dict:
    return {"method": "grid", "metric": {"name": "val_accuracy", "goal": "maximize"},
            "parameters": {k: {"values": v} for k, v in values.items()}, "command": COMMAND}


def agent_env(tmp: Path, api: FakeWandb, data_dir: Path, **extra: str) -> dict[str, str]:
    settings = dict(APP_MODE="agent", SWEEP_ID=api.sweep_path, WANDB_BASE_URL=api.url, WANDB_API_KEY="k" * 40,
                    AGENT_RUN_MODE="offline", ALLOW_CPU="true", DATA_DIR=str(data_dir), VAL_SIZE="200", EPOCHS="1",
                    BATCH_SIZE="64", LOG_INTERVAL="4", WANDB_DIR=str(tmp / "runs"), OUTPUT_DIR=str(tmp / "outputs"),
                    GPU_SLOTS_DIR=str(tmp / "slots"), SWEEP_CLAIMS_DIR=str(tmp / "claims"),
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # the `wandb` CLI
    return clean_env(tmp, **{**settings, **extra})


def start_agent(env: dict[str, str], tmp: Path) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "app.container.entrypoint"], env=env, cwd=REPO,
                            stdout=open(tmp / "agent.log", "wb"), stderr=subprocess.STDOUT)


def runs_in(folder: Path) -> dict[str, tuple[Path, runlog.OfflineRun]]:
    return {run.run_id: (f, run) for f in runlog.find(folder) for run in [runlog.read(f)]}


def comparable(run: runlog.OfflineRun) -> dict:
    """What a run records, less what differs between any two runs (times, ids, folders)."""
    timing = ("_timestamp", "_runtime", "examples_per_s", "_wandb")
    clean = lambda d: {k: v for k, v in d.items() if not k.startswith(timing)}  # noqa: E731
    return {"config": {k: v for k, v in run.config.items() if k != "output_dir"},
            "history": [clean(r) for r in run.history], "summary": clean(run.summary),
            "exit_code": run.exit_code, "sweep_id": run.sweep_id, "project": run.project}


@pytest.mark.slow
def test_warm_runs_are_the_runs_wandb_agent_children_record(tmp_path: Path, small_data: Path):
    sweep = grid(learning_rate=[0.003, 0.03])
    recorded = {}
    for process in ("warm", "per-run"):
        tmp = tmp_path / process
        with FakeWandb(sweep) as api:
            proc = start_agent(agent_env(tmp, api, small_data, AGENT_PROCESS=process), tmp)
            assert proc.wait(timeout=600) == 0, (tmp / "agent.log").read_text()[-4000:]
            handed = {a.run_id: a.params for a in api.assignments}
        runs = runs_in(tmp / "runs")
        assert sorted(runs) == sorted(handed)  # every run the server handed out, and no other
        for run_id, (folder, run) in runs.items():
            assert run.exit_code == 0 and run.config["learning_rate"] == handed[run_id]["learning_rate"], run_id
            assert run.sweep_id == api.sweep_id and run.summary["onnx_argmax_agreement"] == 1.0, run_id
            [model] = artifact.recorded(folder)
            assert sorted(model.files) == ["checkpoint.pt", "model.onnx"] and model.metadata["wandb_sweep"], run_id
            assert (tmp / "outputs" / run_id / "checkpoint.pt").is_file()
        recorded[process] = {run.config["learning_rate"]: comparable(run) for _, run in runs.values()}
        log = (tmp / "agent.log").read_text()
        if process == "warm":
            assert "every run in this process" in log and log.count("ended with exit code 0") == 2
        # the runs are offline: the server has no value of them, so the last line is the best of this agent's own
        # of equal values (both runs may reach 1.0 on this tiny data) the one that started first
        top_value = max(run.summary["val_accuracy"] for _, run in runs.values())
        best_id, (_, top) = min(((run_id, fr) for run_id, fr in runs.items() if fr[1].summary["val_accuracy"] == top_value),
                                key=lambda item: item[1][0].name.split("run-", 1)[1])
        whose = "this agent's runs" if process == "warm" else "the runs trained here since this agent started"
        last = log.strip().splitlines()[-1]
        assert last.startswith(("[warm-agent] best so far", "best so far")) and (
            f"best so far of {whose}: W&B run {best_id}, val_accuracy {top.summary['val_accuracy']:.4f} "
            f"(learning_rate={top.config['learning_rate']}; the best of 2 finished run(s); W&B's server has no "
            f"finished run of sweep {api.sweep_path} with val_accuracy yet (offline runs reach it with `python -m "
            f"app sync`)); train it again: python -m app train --learning_rate={top.config['learning_rate']} "
            f"--epochs=1 ") in last, last
    # the same values, the same seed: the warm process records what a fresh process per run records
    assert recorded["warm"] == recorded["per-run"]


@pytest.mark.slow
def test_the_agent_ends_with_the_sweeps_best_run_by_the_sweeps_metric(tmp_path: Path, small_data: Path):
    # online runs: their summaries reach the server. The sweep minimises val_loss, and its best run is one
    # another agent finished (lower val_loss, though far lower val_accuracy); a failed run's value does not count
    sweep = {**grid(learning_rate=[0.01]), "metric": {"name": "val_loss", "goal": "minimize"}}
    with FakeWandb(sweep) as api:
        api.record_run("elsewhere", {"learning_rate": 0.5, "batch_size": 32}, {"val_loss": 1e-9, "val_accuracy": 0.1})
        api.record_run("failed01", {"learning_rate": 9.0}, {"val_loss": 0.0}, exit_code=1)
        proc = start_agent(agent_env(tmp_path, api, small_data, AGENT_PROCESS="warm", AGENT_RUN_MODE="online"), tmp_path)
        assert proc.wait(timeout=600) == 0, (tmp_path / "agent.log").read_text()[-4000:]
        [trained] = [a.run_id for a in api.assignments]
        assert api.exit_codes[trained] == 0 and 0 < api.summaries[trained]["val_loss"] < 1e3  # its upload reached it
    last = (tmp_path / "agent.log").read_text().strip().splitlines()[-1]
    assert last == (f"[warm-agent] best so far: W&B run elsewhere, val_loss 0.0000 (learning_rate=0.5; the best of 2 "
                    f"finished run(s) of sweep {api.sweep_path} on W&B); train it again: python -m app train "
                    "--learning_rate=0.5 --batch_size=32"), last


@pytest.mark.slow
def test_a_stop_checkpoints_the_running_run_marks_it_preempting_and_exits_143(tmp_path: Path, small_data: Path):
    with FakeWandb(grid(learning_rate=[0.003])) as api:
        api.hold_open = True  # after the stop, the requeued run is what the next agent gets
        env = agent_env(tmp_path, api, small_data, AGENT_PROCESS="warm", EPOCHS="30")
        proc = start_agent(env, tmp_path)
        deadline = time.monotonic() + 300
        # the first epoch's checkpoint: the run is training
        while not list((tmp_path / "outputs").glob("*/checkpoint.pt")) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, (tmp_path / "agent.log").read_text()[-3000:]
        handed = [a.run_id for a in api.assignments]
        assert len(handed) == 1  # the stop ended the agent: nothing else was asked for
        [(folder, run)] = runs_in(tmp_path / "runs").values()
        assert run.run_id == handed[0] and run.preempting and run.exit_code == 143
        ckpt = tmp_path / "outputs" / run.run_id / "checkpoint.pt"
        stopped_after = checkpoint.load(ckpt)["epoch"]
        assert 1 <= stopped_after < 30

        # W&B hands the preempted run out again (same id): a new warm agent resumes it from its checkpoint
        api.requeue(run.run_id)
        api.hold_open = False
        again = start_agent(env, tmp_path / "again")
        assert again.wait(timeout=600) == 0, (tmp_path / "again" / "agent.log").read_text()[-3000:]
    log = (tmp_path / "again" / "agent.log").read_text()
    assert f"resuming run {run.run_id}" in log and f"run {run.run_id} ended with exit code 0" in log
    assert checkpoint.load(ckpt)["epoch"] == 30


@pytest.mark.slow
def test_a_failing_run_fails_alone_and_the_next_starts_clean(tmp_path: Path, small_data: Path):
    # no 8th GPU here: those runs are refused before W&B opens a run (exit 2, one line, as a `python -m app
    # train` child refuses them: nothing is left to sync); the runs after them train as if nothing had happened
    with FakeWandb(grid(device=["cuda:7", "cpu"], learning_rate=[0.01, 0.03])) as api:
        proc = start_agent(agent_env(tmp_path, api, small_data, AGENT_PROCESS="warm"), tmp_path)
        assert proc.wait(timeout=600) == 0, (tmp_path / "agent.log").read_text()[-4000:]
        order = [(a.run_id, a.params["device"]) for a in api.assignments]
    assert [device for _, device in order] == ["cuda:7", "cuda:7", "cpu", "cpu"]
    runs = runs_in(tmp_path / "runs")
    assert sorted(runs) == sorted(run_id for run_id, device in order if device == "cpu")
    log = (tmp_path / "agent.log").read_text()
    assert log.count("error: device='cuda:7' but no CUDA device is visible") == 2, log[-4000:]
    for run_id, device in order:
        assert f"run {run_id} ended with exit code {2 if device == 'cuda:7' else 0}" in log, run_id
        if device == "cpu":
            folder, run = runs[run_id]
            assert run.exit_code == 0 and run.summary["onnx_argmax_agreement"] == 1.0 and artifact.recorded(folder)
    ok = [runs[run_id][1] for run_id, device in order if device == "cpu"]
    assert ok[0].summary["test_loss"] != ok[1].summary["test_loss"]  # each its own learning rate


@pytest.mark.slow
def test_diverged_runs_are_finished_runs_and_the_agent_goes_on(tmp_path: Path, small_data: Path):
    # three runs whose learning rate diverges (NaN by the second step on these images), then one that trains:
    # three failures in a row would stop the agent; diverged runs are finished (exit 0, summary diverged)
    diverging = [1e12, 1e13, 1e14]
    with FakeWandb(grid(learning_rate=[*diverging, 0.01])) as api:
        proc = start_agent(agent_env(tmp_path, api, small_data, AGENT_PROCESS="warm", EPOCHS="2",
                                     BATCH_SIZE="32", LOG_INTERVAL="2"), tmp_path)
        assert proc.wait(timeout=600) == 0, (tmp_path / "agent.log").read_text()[-4000:]
        handed = {a.run_id: a.params["learning_rate"] for a in api.assignments}
    assert sorted(handed.values()) == [0.01, *diverging]
    log = (tmp_path / "agent.log").read_text()
    runs = runs_in(tmp_path / "runs")
    assert sorted(runs) == sorted(handed)
    for run_id, lr in handed.items():
        folder, run = runs[run_id]
        assert f"run {run_id} ended with exit code 0" in log and run.exit_code == 0 and not run.preempting, run_id
        if lr in diverging:
            assert f"done: run {run_id} diverged: loss " in log and run.summary["diverged"] is True, run_id
            assert not artifact.recorded(folder) and not (tmp_path / "outputs" / run_id / "model.onnx").exists()
        else:
            assert "diverged" not in run.summary and 0 < run.summary["test_accuracy"] <= 1
            assert artifact.recorded(folder) and (tmp_path / "outputs" / run_id / "model.onnx").is_file()


@pytest.mark.slow
def test_an_early_terminate_stop_ends_the_run_after_its_epoch_as_a_pruned_finished_run(tmp_path: Path, small_data: Path):
    # hyperband stops the long run (W&B's `stop` command in the heartbeat answer, once the agent reports it
    # running: its first heartbeat comes POLL_S after the run starts); the short run after it is untouched
    long_run = 300
    sweep = {**grid(epochs=[long_run, 2]), "early_terminate": {"type": "hyperband", "min_iter": 1}}
    with FakeWandb(sweep) as api:
        api.early_stop.append({"epochs": long_run})
        proc = start_agent(agent_env(tmp_path, api, small_data, AGENT_PROCESS="warm"), tmp_path)
        assert proc.wait(timeout=600) == 0, (tmp_path / "agent.log").read_text()[-4000:]
        stopped_id, next_id = [a.run_id for a in api.assignments]
        # handed out once each: the stopped run was not requeued (no "resume"), the agent went on to the next
        assert [(a.command, a.params) for a in api.assignments] == [("run", {"epochs": long_run}), ("run", {"epochs": 2})]
        assert set(api.stops) == {stopped_id}
    log = (tmp_path / "agent.log").read_text()
    runs = runs_in(tmp_path / "runs")
    assert sorted(runs) == sorted([stopped_id, next_id])

    folder, stopped = runs[stopped_id]
    epochs_done = checkpoint.load(tmp_path / "outputs" / stopped_id / "checkpoint.pt")["epoch"]
    assert 1 <= epochs_done < long_run and stopped.config["epochs"] == long_run
    assert len(stopped.metric("val_accuracy")) == epochs_done  # it trained no epoch past the checkpoint's
    assert stopped.summary["pruned"] is True and stopped.exit_code == 0 and not stopped.preempting
    assert "test_accuracy" not in stopped.summary and not artifact.recorded(folder)
    assert not (tmp_path / "outputs" / stopped_id / "model.onnx").exists()
    assert f"stopped early after epoch {epochs_done}" in log and f"run {stopped_id} ended with exit code 0" in log
    assert "Changes to your `wandb` environment variables" not in log  # W&B's settings stay as the agent set them

    folder, finished = runs[next_id]
    assert finished.exit_code == 0 and not finished.preempting and "pruned" not in finished.summary
    assert len(finished.metric("val_accuracy")) == 2 and 0 < finished.summary["test_accuracy"] <= 1
    assert (tmp_path / "outputs" / next_id / "model.onnx").is_file() and artifact.recorded(folder)


@pytest.mark.slow
def test_per_run_an_early_terminate_stop_is_a_sigterm_and_marks_the_run_preempting(tmp_path: Path, small_data: Path):
    # the per-run limitation docs/sweeps.md states: `wandb agent` carries out W&B's `stop` by SIGTERM to the run's
    # process, which that process can't tell from `docker stop`: it checkpoints and exits 143 marked preempting
    long_run = 300
    sweep = {**grid(epochs=[long_run, 1]), "early_terminate": {"type": "hyperband", "min_iter": 1}}
    with FakeWandb(sweep) as api:
        # a run another agent finished and uploaded: the server's best, which the agent's last line names
        api.record_run("other123", {"epochs": 3}, {"val_accuracy": 0.5})
        proc = start_agent(agent_env(tmp_path, api, small_data, AGENT_PROCESS="per-run"), tmp_path)
        # hyperband's first rung: the stop comes once the run has trained an epoch (a stop before that
        # finds no W&B run yet: the process exits 143 with nothing recorded)
        wait_for(lambda: list((tmp_path / "outputs").glob("*/checkpoint.pt")), 300, "the first epoch's checkpoint")
        api.early_stop.append({"epochs": long_run})
        assert proc.wait(timeout=600) == 0, (tmp_path / "agent.log").read_text()[-4000:]
        stopped_id, next_id = [a.run_id for a in api.assignments]
        assert set(api.stops) == {stopped_id}
    runs = runs_in(tmp_path / "runs")
    stopped, finished = runs[stopped_id][1], runs[next_id][1]
    assert stopped.preempting and stopped.exit_code == 143 and "pruned" not in stopped.summary
    assert checkpoint.load(tmp_path / "outputs" / stopped_id / "checkpoint.pt")["epoch"] < long_run
    assert finished.exit_code == 0 and not finished.preempting  # `wandb agent` went on to the next run
    last = (tmp_path / "agent.log").read_text().strip().splitlines()[-1]
    # the trained run (one epoch on these images) reaches the server only with `python -m app sync`
    assert last == (f"best so far: W&B run other123, val_accuracy 0.5000 (epochs=3; the best of 1 finished run(s) "
                    f"of sweep {api.sweep_path} on W&B); train it again: python -m app train --epochs=3"), last


@pytest.mark.slow
def test_a_warm_process_killed_mid_run_is_replaced_and_the_sweep_goes_on(tmp_path: Path, small_data: Path):
    # the kernel's OOM killer (SIGKILL) takes the warm process in the middle of a run: as under `wandb agent`,
    # that run is lost (never finished), and a fresh process takes the sweep's next run
    long_run = 300
    with FakeWandb(grid(epochs=[long_run, 1])) as api:
        proc = start_agent(agent_env(tmp_path, api, small_data, AGENT_PROCESS="warm"), tmp_path)
        wait_for(lambda: list((tmp_path / "outputs").glob("*/checkpoint.pt")), 300, "the first epoch's checkpoint")
        pids = re.findall(r"every run in this process \(pid (\d+),", (tmp_path / "agent.log").read_text())
        assert len(pids) == 1 and int(pids[0]) != proc.pid
        os.kill(int(pids[0]), signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, (tmp_path / "agent.log").read_text()[-4000:]
        killed_id, next_id = [a.run_id for a in api.assignments]
    log = (tmp_path / "agent.log").read_text()
    assert (f"the warm process was killed by SIGKILL during run {killed_id} (lost as a crashed run: W&B marks it "
            "crashed); starting a fresh one for the sweep's next run") in log
    assert len(re.findall(r"every run in this process \(pid (\d+),", log)) == 2
    # W&B's service went down with the process: the killed run's log holds what reached it, and no end
    (killed,) = [runlog.read(f) for f in runlog.find(tmp_path / "runs") if f.name.endswith(f"-{killed_id}")]
    assert killed.exit_code is None and not killed.finished
    runs = runs_in(tmp_path / "runs")
    assert runs[next_id][1].exit_code == 0 and 0 < runs[next_id][1].summary["test_accuracy"] <= 1


def tree(pid: int) -> list[int]:
    """`pid` and every process below it, parents first."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *(p for child in children for p in tree(int(child)))]


def outage_lines(log: str, api: FakeWandb) -> list[str]:
    return [line for line in log.splitlines() if f"W&B server {api.url} (WANDB_BASE_URL) did not answer" in line]


def ended_within(procs: list[subprocess.Popen], since: float, bound: float, logs: list[Path]) -> list[tuple[int, float, float]]:
    """Each process's exit code, how long after `since` it ended and how long after its outage line showed
    in its log (`logs`, one per process); a process still running at the bound fails, with the end of its log."""
    ended, said = {}, {}
    while len(ended) < len(procs) and time.monotonic() - since < bound:
        for i, proc in enumerate(procs):
            if i not in said and "(WANDB_BASE_URL) did not answer" in logs[i].read_text():
                said[i] = time.monotonic()
            if i not in ended and proc.poll() is not None:
                now = time.monotonic()
                ended[i] = (proc.returncode, now - since, now - said.get(i, now))
        time.sleep(0.2)
    running = [i for i in range(len(procs)) if i not in ended]
    for i in running:
        procs[i].kill()
    assert not running, f"still running {bound:.0f} s after the server went away:\n" + "\n".join(
        f"{logs[i]}:\n{logs[i].read_text()[-3000:]}" for i in running)
    return [ended[i] for i in range(len(procs))]


def assert_ends_soon_after_its_line(name: str, after_line: float) -> None:
    # whatever W&B's exit handlers still wait for on the gone server (its telemetry's last export held an
    # idle agent 10 s to over 50 s): the process ends server.EXIT_S after its line (5 s: room for a busy host)
    assert after_line <= server.EXIT_S + 5, f"{name}: ended {after_line:.1f} s after its outage line"


# the outage tests' AGENT_OUTAGE_S: the default minute's behaviour, proven without waiting a minute
OUTAGE_S = 12
# what the bound allows besides OUTAGE_S: the heartbeat's interval, the batch the checkpoint waits for,
# an online run's finish given up after server.FINISH_S, and what runs at exit after the line, cut at
# server.EXIT_S (W&B's telemetry flushing to a silent server held an idle agent 10 s to over 50 s more)
SLACK_S = 50


@pytest.mark.slow
def test_a_server_that_goes_away_mid_run_is_one_line_exit_1_and_the_run_checkpointed(tmp_path: Path, small_data: Path):
    # two agents side by side, each mid-run: one's server stays open and silent (accepts, never answers)
    # under an online run, whose finish would wait on the server for minutes; the other's port is closed
    # under an offline run. Today W&B's own retry loop holds either for minutes with no line
    with FakeWandb(grid(learning_rate=[0.003])) as silent, FakeWandb(grid(learning_rate=[0.003])) as gone:
        agents = []
        for name, api, mode in (("silent", silent, "online"), ("gone", gone, "offline")):
            env = agent_env(tmp_path / name, api, small_data, AGENT_PROCESS="warm", EPOCHS="100000", AGENT_RUN_MODE=mode,
                            AGENT_OUTAGE_S=str(OUTAGE_S))
            agents.append(start_agent(env, tmp_path / name))
        for name, proc in zip(("silent", "gone"), agents):
            wait_for(lambda: list((tmp_path / name / "outputs").glob("*/checkpoint.pt")) or proc.poll() is not None,
                     300, f"{name}: the first epoch's checkpoint")
            assert proc.poll() is None, (tmp_path / name / "agent.log").read_text()[-3000:]
        silent.go_silent()
        gone.go_away()
        since = time.monotonic()
        ended = ended_within(agents, since, OUTAGE_S + SLACK_S, [tmp_path / n / "agent.log" for n in ("silent", "gone")])
        for (name, api), (code, seconds, after_line) in zip((("silent", silent), ("gone", gone)), ended):
            log = (tmp_path / name / "agent.log").read_text()
            print(f"{name}: exit {code} {seconds:.1f} s after the server went away, {after_line:.1f} s after its line")
            assert code == 1, (name, log[-3000:])
            assert_ends_soon_after_its_line(name, after_line)
            [line] = outage_lines(log, api)
            assert f"did not answer for {OUTAGE_S} s" in line, line  # the bound AGENT_OUTAGE_S set
            [folder] = (tmp_path / name / "runs" / "wandb").glob("*run-*")  # online run-*, offline offline-run-*
            run = runlog.read(folder)
            assert f"run {run.run_id} checkpointed and marked preempting" in line, line
            # the online run's finish waits on the gone server: it is given up on, its data kept for `wandb sync`
            assert ("its upload was given up" in line) == (name == "silent"), line
            assert "Traceback" not in log and "k" * 40 not in log, log[-3000:]  # one line, and no secret
            # the run's retry resumes: its checkpoint is there and the run is marked preempting, not finished
            assert run.preempting and run.exit_code != 0, name
            assert 1 <= checkpoint.load(tmp_path / name / "outputs" / run.run_id / "checkpoint.pt")["epoch"] < 100000
            assert len(api.assignments) == 1


@pytest.mark.slow
def test_a_server_that_goes_away_between_runs_is_one_line_and_exit_1(tmp_path: Path, small_data: Path):
    # idle: the one run is done and the agent is waiting for the next (hold_open) when the server goes
    with FakeWandb(grid(learning_rate=[0.003])) as silent, FakeWandb(grid(learning_rate=[0.003])) as gone:
        agents = []
        for name, api in (("silent", silent), ("gone", gone)):
            api.hold_open = True
            env = agent_env(tmp_path / name, api, small_data, AGENT_PROCESS="warm", AGENT_OUTAGE_S=str(OUTAGE_S))
            agents.append(start_agent(env, tmp_path / name))
        for name, proc in zip(("silent", "gone"), agents):
            wait_for(lambda: "ended with exit code 0" in (tmp_path / name / "agent.log").read_text() or proc.poll() is not None,
                     300, f"{name}: the run's end")
            assert proc.poll() is None, (tmp_path / name / "agent.log").read_text()[-3000:]
        silent.go_silent()
        gone.go_away()
        ended = ended_within(agents, time.monotonic(), OUTAGE_S + SLACK_S,
                             [tmp_path / n / "agent.log" for n in ("silent", "gone")])
        for (name, api), (code, seconds, after_line) in zip((("silent", silent), ("gone", gone)), ended):
            log = (tmp_path / name / "agent.log").read_text()
            print(f"{name}: exit {code} {seconds:.1f} s after the server went away, {after_line:.1f} s after its line")
            assert code == 1, (name, log[-3000:])
            assert_ends_soon_after_its_line(name, after_line)
            [line] = outage_lines(log, api)
            assert "no run was in progress" in line and f"did not answer for {OUTAGE_S} s" in line, line
            assert "Traceback" not in log, log[-3000:]
            # before it, the best of what this agent ran, from its own run log: the server is not asked again
            [(_, run)] = runs_in(tmp_path / name / "runs").values()
            [best] = [t for t in log.splitlines() if "best so far" in t]
            assert best.startswith(
                f"[warm-agent] best so far of this agent's runs: W&B run {run.run_id}, val_accuracy "
                f"{run.summary['val_accuracy']:.4f} (learning_rate=0.003; the best of 1 finished run(s); W&B's server "
                "could not be asked (it stopped answering); ranked by val_accuracy (maximize), assumed: the sweep's "
                "metric is on the server); train it again: python -m app train --learning_rate=0.003 "), best
            assert log.strip().splitlines()[-1] == line  # the error is the last word


@pytest.mark.slow
def test_a_server_gone_at_the_start_is_one_line_and_exit_1(tmp_path: Path, small_data: Path):
    # W&B's client checks the API key with the server when the agent starts: a closed port there was a
    # traceback (AuthenticationError) after W&B's own timeout
    with FakeWandb(grid(learning_rate=[0.003])) as api:
        pass  # the port is closed again
    proc = start_agent(agent_env(tmp_path, api, small_data, AGENT_PROCESS="warm", AGENT_OUTAGE_S=str(OUTAGE_S)), tmp_path)
    [(code, seconds, after_line)] = ended_within([proc], time.monotonic(), OUTAGE_S + SLACK_S, [tmp_path / "agent.log"])
    log = (tmp_path / "agent.log").read_text()
    assert code == 1, log[-3000:]
    assert_ends_soon_after_its_line("agent", after_line)
    [line] = [line for line in log.splitlines() if f"W&B server {api.url} (WANDB_BASE_URL) did not answer" in line]
    assert "Connection refused" in line and "no run was in progress" in line, line
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_a_stop_while_idle_is_one_line_and_no_traceback(tmp_path: Path, small_data: Path):
    with FakeWandb(grid(learning_rate=[0.003])) as api:
        api.hold_open = True
        proc = start_agent(agent_env(tmp_path, api, small_data, AGENT_PROCESS="warm"), tmp_path)
        wait_for(lambda: "ended with exit code 0" in (tmp_path / "agent.log").read_text() or proc.poll() is not None,
                 300, "the run's end")
        time.sleep(warm_agent.POLL_S + 1)  # polling for the next run: a heartbeat, then the wait between them
        # as a plain `scancel` does (and any stop of the whole process tree): every process of the agent is
        # sent SIGTERM, the supervisor, the warm process and W&B's service, besides the supervisor's forward
        for pid in reversed(tree(proc.pid)):
            os.kill(pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, (tmp_path / "agent.log").read_text()[-3000:]
    log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log and "Stopped" not in log, log[-3000:]
    tail = log[log.index("ended with exit code 0"):].splitlines()[1:]
    assert len(tail) == 1 and "stopped by SIGTERM" in tail[0], tail


CHILD = """
import os, signal, sys
report = os.fdopen(int(sys.argv[1]), "w", buffering=1)
for line in sys.argv[2:]:
    if line == "die":
        os.kill(os.getpid(), signal.SIGSEGV)
    if line.startswith("exit"):
        sys.exit(int(line.split()[1]))
    report.write(line + "\\n")
"""


@pytest.fixture
def own_signal_handlers():
    """The supervisor forwards SIGTERM/SIGINT to its child from here on: pytest's handlers back after."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class ScriptedSupervisor(supervisor.Supervisor):
    """The supervisor with each warm process replaced by a small real one that reports the given lines."""

    def __init__(self, scripts: list[list[str]], count: int | None = None):
        super().__init__("fakeswp1", os.environ, count)
        self.scripts, self.started = scripts, []

    def command(self, report_fd: int) -> list[str]:
        self.started.append(super().command(report_fd))
        return [sys.executable, "-c", CHILD, str(report_fd), *self.scripts[len(self.started) - 1]]


def test_crashes_count_as_failures_in_a_row_across_processes(capsys, own_signal_handlers):
    # one good run, then three processes that each die in their run: the third failure in a row ends it
    sup = ScriptedSupervisor([["start a", "end 0", "start b", "die"], ["start c", "die"], ["start d", "die"]])
    assert sup.run() == 1
    assert len(sup.started) == 3 and sup.done == 4 and sup.failures_in_a_row == 3
    out = capsys.readouterr().out
    assert "was killed by SIGSEGV during run d (lost as a crashed run" in out and "3 failures in a row" in out


def test_a_process_that_cannot_be_trusted_is_replaced_and_agent_count_carries_over(own_signal_handlers):
    # AGENT_COUNT=3: the first process runs two that fail (the second by a CUDA error, so the process ends
    # itself); that is two failures in a row, not three, and the next process runs the one left
    sup = ScriptedSupervisor([["start a", "end 1", "start b", "end 1", f"exit {warm_agent.UNTRUSTED}"],
                              ["start c", "end 0", "exit 0"]], count=3)
    assert sup.run() == 0
    assert [cmd[cmd.index("--count") + 1] for cmd in sup.started] == ["3", "1"]
    assert [cmd[cmd.index("--failed-in-a-row") + 1] for cmd in sup.started] == ["0", "2"]  # the next starts at 2
    assert sup.done == 3 and sup.failures_in_a_row == 0


def test_an_agent_that_ends_for_its_own_reason_is_not_restarted(own_signal_handlers):
    sup = ScriptedSupervisor([["start a", "end 2", "exit 1"]])
    assert sup.run() == 1 and len(sup.started) == 1


# --- the closing line (app.sweep.wandb.best), from the stand-in's SweepWithRuns answer: no training ---

def sweep_answer(api: FakeWandb) -> best.Sweep:
    """What best.ask reads, from the stand-in's answer to its own query (no request on the network)."""
    reply = api.answer({"query": best.QUERY, "variables": {"entity": api.entity, "project": api.project,
                                                            "sweep": api.sweep_id}})
    return best.parse(reply["data"])


def test_only_finished_runs_with_a_finite_value_count_and_the_sweeps_goal_picks():
    with FakeWandb({**grid(learning_rate=[0.1]), "metric": {"name": "val_loss", "goal": "minimize"}}) as api:
        api.record_run("good", {"learning_rate": 0.01}, {"val_loss": 0.5})
        api.record_run("better", {"learning_rate": 0.02}, {"val_loss": 0.25})
        api.record_run("worse", {"learning_rate": 0.03}, {"val_loss": 0.75})
        # none of these is a best: a failed run, a pruned one, a duplicate, a diverged one (NaN), one with no value
        api.record_run("failed", {"learning_rate": 0.04}, {"val_loss": 0.0}, exit_code=1)
        api.record_run("pruned", {"learning_rate": 0.05}, {"val_loss": 0.01, "pruned": True})
        api.record_run("duplicat", {"learning_rate": 0.06}, {"val_loss": 0.01, "duplicate_of": "good"})
        api.record_run("diverged", {"learning_rate": 1e9}, {"val_loss": float("nan"), "diverged": True})
        api.record_run("novalue", {"learning_rate": 0.07}, {"loss": 0.0})
        found = sweep_answer(api)
    assert (found.metric, found.goal, found.params) == ("val_loss", "minimize", ["learning_rate"])
    assert best.line("e/p/s", found, "", []) == (
        "best so far: W&B run better, val_loss 0.2500 (learning_rate=0.02; the best of 3 finished run(s) of sweep "
        "e/p/s on W&B); train it again: python -m app train --learning_rate=0.02")


def test_a_sweep_with_no_finished_run_says_so_and_one_with_no_metric_says_what_is_assumed():
    with FakeWandb(grid(learning_rate=[0.1])) as api:
        api.record_run("failed", {"learning_rate": 0.04}, {"val_accuracy": 0.9}, exit_code=1)
        assert best.line("s1", sweep_answer(api), "", []) == "sweep s1: no run has finished with a value of val_accuracy yet"
    with FakeWandb({k: v for k, v in grid(learning_rate=[0.1]).items() if k != "metric"}) as api:
        api.record_run("r1", {"learning_rate": 0.04}, {"val_accuracy": 0.9})
        assert best.line("s1", sweep_answer(api), "", []) == (
            "best so far: W&B run r1, val_accuracy 0.9000 (learning_rate=0.04; the best of 1 finished run(s) of sweep s1 "
            "on W&B; ranked by val_accuracy (maximize), assumed: the sweep's config names no metric); train it again: "
            "python -m app train --learning_rate=0.04")
    assert best.line("s1", None, "it stopped answering", []) == (
        "sweep s1: none of this agent's runs has finished with a value of val_accuracy (W&B's server could not be "
        "asked (it stopped answering))")


def test_a_server_that_does_not_answer_the_closing_question_is_a_line_within_its_bound(tmp_path: Path):
    # the per-run agent connects only for its last line: a silent server (it accepts and never answers) holds
    # it AGENT_OUTAGE_S at most (here 3 s), then the line says so; no traceback, exit 0
    with FakeWandb(grid(learning_rate=[0.1])) as api:
        api.go_silent()
        env = clean_env(tmp_path, WANDB_BASE_URL=api.url, WANDB_API_KEY="k" * 40, AGENT_OUTAGE_S="3",
                        WANDB_DIR=str(tmp_path / "runs"))
        proc = subprocess.run([sys.executable, "-c", "import sys, time; import wandb; from app.sweep.wandb import best; "
                               f"t = time.monotonic(); print(best.closing_line(None, {api.sweep_path!r}, [])); "
                               "print(time.monotonic() - t, file=sys.stderr)"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    took = float(proc.stderr.strip().splitlines()[-1])  # from the question to the line, W&B's service start included
    assert proc.stdout.strip().startswith(
        f"sweep {api.sweep_path}: none of this agent's runs has finished with a value of val_accuracy (W&B's server "
        "could not be asked (did not answer the API key check at the start ("), proc.stdout
    assert took < 3 + 10, took  # W&B's own 19 s request timeout would not fit
