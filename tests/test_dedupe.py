"""Duplicate sweep runs: a parameter set claimed by a live or finished run is skipped, a dead claim is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, clean_env, run_app

from app import runlog
from app.errors import UserError
from app.sweep.wandb import dedupe

SWEEP = "swp12345"
PARAMS = {"learning_rate": 0.01, "batch_size": 64}


def record(folder: Path, params=PARAMS) -> dict:
    return json.loads((folder / SWEEP / f"{dedupe.key(params)}.json").read_text())


def test_key_is_canonical():
    assert dedupe.key({"a": 1, "b": [16, 32]}) == dedupe.key({"b": [16, 32], "a": 1})
    assert dedupe.key({"a": 1}) != dedupe.key({"a": 2}) != dedupe.key({"a": 1, "b": 1})


def test_params_come_from_the_agents_param_file_or_the_arguments(tmp_path: Path):
    # the file `wandb agent` writes for each run (WANDB_SWEEP_PARAM_PATH), in its own format
    path = tmp_path / "config-abc.yaml"
    path.write_text("wandb_version: 1\n\nlearning_rate:\n  value: 0.01\nbatch_size:\n  value: 64\n")
    got = dedupe.sweep_params({"WANDB_SWEEP_PARAM_PATH": str(path)}, [])
    assert {k: v for k, v in got.items() if k != "wandb_version"} == PARAMS
    assert dedupe.sweep_params({}, ["--learning_rate=0.01", "--batch_size", "64"]) == {"learning_rate": "0.01", "batch_size": "64"}


def test_live_claim_then_finished_record_make_duplicates(tmp_path: Path):
    first = dedupe.claim(SWEEP, "run-a", PARAMS, tmp_path)
    assert first.duplicate_of is None and record(tmp_path)["state"] == "running"
    second = dedupe.claim(SWEEP, "run-b", PARAMS, tmp_path)  # handed out at the same moment
    assert (second.duplicate_of, second.other_state) == ("run-a", "running")
    assert "skipping duplicate sweep run run-b: run run-a is running the same parameters" in dedupe.skip_message(second)
    other = dedupe.claim(SWEEP, "run-c", {**PARAMS, "batch_size": 128}, tmp_path)
    assert other.duplicate_of is None  # different values: no conflict
    first.close(dedupe.FINISHED)
    other.close(dedupe.FINISHED)
    later = dedupe.claim(SWEEP, "run-d", PARAMS, tmp_path)
    assert (later.duplicate_of, later.other_state) == ("run-a", "finished")
    assert record(tmp_path)["run_id"] == "run-a"  # a duplicate never overwrites the record


def test_preempted_or_failed_params_can_run_again(tmp_path: Path):
    c = dedupe.claim(SWEEP, "run-a", PARAMS, tmp_path)
    c.close(dedupe.PREEMPTED)
    again = dedupe.claim(SWEEP, "run-a", PARAMS, tmp_path)  # the requeued run, same id: resumes
    assert again.duplicate_of is None and record(tmp_path)["state"] == "running"
    again.close(dedupe.FINISHED)
    same = dedupe.claim(SWEEP, "run-a", PARAMS, tmp_path)  # its own finished record does not block it
    assert same.duplicate_of is None
    same.close(dedupe.FAILED)
    retry = dedupe.claim(SWEEP, "run-z", PARAMS, tmp_path)  # a failure gives the params up
    assert retry.duplicate_of is None and record(tmp_path)["run_id"] == "run-z"
    retry.close(dedupe.FINISHED)


def test_a_killed_claimant_leaves_no_stale_claim(tmp_path: Path):
    code = (f"import sys, time; from pathlib import Path; from app.sweep.wandb import dedupe\n"
            f"dedupe.claim({SWEEP!r}, 'run-dead', {PARAMS!r}, Path({str(tmp_path)!r}))\n"
            f"print('claimed', flush=True); time.sleep(300)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert p.stdout.readline().strip() == "claimed"
        assert dedupe.claim(SWEEP, "run-b", PARAMS, tmp_path).duplicate_of == "run-dead"  # alive: a duplicate
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()
    assert record(tmp_path)["state"] == "running"  # what the dead run last wrote...
    took = dedupe.claim(SWEEP, "run-b", PARAMS, tmp_path)  # ...but its lock died with it
    assert took.duplicate_of is None and record(tmp_path)["run_id"] == "run-b"
    took.close(dedupe.FINISHED)


def test_guard_only_acts_inside_a_sweep_and_records_failures(tmp_path: Path):
    base = {"SWEEP_CLAIMS_DIR": str(tmp_path), "WANDB_RUN_ID": "run-a"}
    with dedupe.guard(base, ["--learning_rate=0.01"]) as c:
        assert c is None  # no WANDB_SWEEP_ID: a plain run
    with dedupe.guard({**base, "WANDB_SWEEP_ID": SWEEP, "SWEEP_DEDUPE": "false"}, []) as c:
        assert c is None  # switched off
    with pytest.raises(RuntimeError):
        with dedupe.guard({**base, "WANDB_SWEEP_ID": SWEEP}, ["--learning_rate=0.01", "--batch_size=64"]) as c:
            assert c is not None and c.duplicate_of is None
            raise RuntimeError("training crashed")
    assert record(tmp_path, {"learning_rate": "0.01", "batch_size": "64"})["state"] == "failed"


def test_stagger(tmp_path: Path):
    assert dedupe.stagger({}) == 0
    assert dedupe.stagger({"AGENT_START_STAGGER": "2.5", "AGENT_INDEX": "3"}) == 7.5
    assert dedupe.stagger({"AGENT_START_STAGGER": "2.5"}) == 0  # no slot claimed: the first agent
    for bad in ("soon", "-1", "601"):
        with pytest.raises(UserError, match=f"AGENT_START_STAGGER='{bad}' must be seconds between 0 and 600"):
            dedupe.stagger({"AGENT_START_STAGGER": bad})
    with pytest.raises(UserError, match="SWEEP_CLAIMS_DIR=.* is not usable for sweep claims"):
        (tmp_path / "f").write_text("")
        dedupe.claim(SWEEP, "r", PARAMS, tmp_path / "f")


def test_train_skips_a_duplicate_and_records_a_finished_run(tmp_path: Path, small_data: Path):
    """`python -m app train` as `wandb agent` starts it: the skip exits 0, trains nothing, and leaves a W&B
    run tagged `duplicate` that names the run holding its values (it used up one of run_cap)."""
    claims = tmp_path / "claims"
    env = clean_env(tmp_path, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "runs"), OUTPUT_DIR=str(tmp_path / "out"),
                    DATA_DIR=str(small_data), EPOCHS="1", VAL_SIZE="200", TRAIN_STRIDE="1", WATCH_LOG="none",
                    WANDB_SWEEP_ID=SWEEP, SWEEP_CLAIMS_DIR=str(claims))
    args = ["train", "--learning_rate=0.01", "--batch_size=64"]
    r = run_app(args, {**env, "WANDB_RUN_ID": "runfirst"}, tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(next((claims / SWEEP).glob("*.json")).read_text())
    assert (rec["run_id"], rec["state"]) == ("runfirst", "finished")
    (folder,) = runlog.find(tmp_path / "runs")
    assert runlog.read(folder).sweep_id == SWEEP
    dup = run_app(args, {**env, "WANDB_RUN_ID": "rundupe1"}, tmp_path, timeout=120)
    assert dup.returncode == 0, dup.stderr[-2000:]
    assert "skipping duplicate sweep run rundupe1: run runfirst already finished the same parameters" in dup.stderr
    assert not (tmp_path / "out" / "rundupe1").exists()  # nothing trained
    (dup_folder,) = [f for f in runlog.find(tmp_path / "runs") if f != folder]
    recorded = runlog.read(dup_folder)
    assert recorded.run_id == "rundupe1" and recorded.exit_code == 0 and recorded.sweep_id == SWEEP
    assert recorded.summary["duplicate_of"] == "runfirst" and recorded.summary["duplicate_state"] == "finished"
    assert not recorded.history  # no metric: bayes and hyperband never read it as a result
    assert b"duplicate" in next(dup_folder.glob("run-*.wandb")).read_bytes()  # job type and tag


def test_an_orphaned_run_is_resumed_once_by_the_agent_that_holds_it(tmp_path: Path):
    """A run stopped with W&B's service gone (W&B never told) is recorded orphaned; an agent on the sweep
    resumes it under its own run id, a second agent looking at the same moment leaves it alone, and once
    it finished nobody resumes it again."""
    from app.runner import ORPHANED
    from app.sweep.wandb import orphans

    environ = {"WANDB_DIR": str(tmp_path / "runs")}
    folder = dedupe.claims_dir(environ)
    stopped = dedupe.claim(SWEEP, "run00001", PARAMS, folder)
    stopped.close(ORPHANED)
    dedupe.claim(SWEEP, "run00002", {**PARAMS, "learning_rate": 0.5}, folder).close(dedupe.PREEMPTED)  # W&B told
    resumed: list[tuple[str, dict]] = []

    def resume(doc: dict) -> int:
        # meanwhile another agent looks: the run is held, it has nothing to resume
        assert orphans.resume_all(environ, f"ent/proj/{SWEEP}", lambda d: pytest.fail(f"resumed twice: {d}")) == 0
        again = dedupe.claim(SWEEP, doc["run_id"], doc["params"], folder)  # what the resumed run's guard takes
        assert again.duplicate_of is None
        again.close(dedupe.FINISHED)
        resumed.append((doc["run_id"], doc["params"]))
        return 0

    assert orphans.resume_all(environ, f"ent/proj/{SWEEP}", resume) == 0
    assert resumed == [("run00001", PARAMS)]
    assert orphans.resume_all(environ, SWEEP, lambda d: pytest.fail(f"a finished run resumed: {d}")) == 0
    assert orphans.sweep_args({"params": PARAMS}) == {k: {"value": v} for k, v in PARAMS.items()}


def test_a_stop_before_training_leaves_the_run_orphaned_unless_w_and_b_was_told(tmp_path: Path):
    from app import interrupts

    environ = {"WANDB_DIR": str(tmp_path / "runs"), "WANDB_SWEEP_ID": SWEEP, "WANDB_RUN_ID": "run00003"}
    folder = dedupe.claims_dir(environ)
    for told, state in ((False, "orphaned"), (True, dedupe.PREEMPTED)):
        stop = interrupts.Stopped(signal.SIGTERM)
        stop.told = told
        with pytest.raises(interrupts.Stopped):
            with dedupe.guard(environ, ["--learning_rate=0.01", "--batch_size=64"]):
                raise stop
        doc = record(folder, {"learning_rate": "0.01", "batch_size": "64"})  # as parsed from the arguments
        assert doc["state"] == state and doc["run_id"] == "run00003"


def test_a_hand_out_is_orphaned_after_a_stop_unless_its_end_is_on_record(tmp_path: Path):
    """The agent's record of a run it handed out (app.sweep.wandb.handouts): after a stop, a run that never
    recorded itself (killed while starting) is recorded orphaned; one that finished, or whose values a
    live run holds, is left alone; without a stop nothing is recorded; a hand-out whose agent died
    unsettled is settled by the next agent, one held by a live agent is not."""
    from app.runner import ORPHANED
    from app.sweep.wandb import handouts

    h = handouts.record(tmp_path, SWEEP, "run00001", PARAMS)
    assert handouts.record(tmp_path, SWEEP, "run00001", PARAMS) is None  # held by its agent
    handouts.settle_abandoned(tmp_path, SWEEP)  # its agent is alive: not touched
    assert h.path.exists() and not (tmp_path / SWEEP / f"{dedupe.key(PARAMS)}.json").exists()
    handouts.settle(h, stopped=True)
    assert not h.path.exists() and (record(tmp_path)["state"], record(tmp_path)["run_id"]) == (ORPHANED, "run00001")

    finished = {**PARAMS, "learning_rate": 0.5}
    dedupe.claim(SWEEP, "run00002", finished, tmp_path).close(dedupe.FINISHED)
    handouts.settle(handouts.record(tmp_path, SWEEP, "run00002", finished), stopped=True)
    live = {**PARAMS, "learning_rate": 0.7}
    holder = dedupe.claim(SWEEP, "run00003", live, tmp_path)  # the run is alive: it records its own end
    handouts.settle(handouts.record(tmp_path, SWEEP, "run00003", live), stopped=True)
    crashed = {**PARAMS, "learning_rate": 0.9}
    handouts.settle(handouts.record(tmp_path, SWEEP, "run00004", crashed), stopped=False)  # no stop: a crash
    assert [record(tmp_path, p)["state"] for p in (finished, live)] == [dedupe.FINISHED, dedupe.RUNNING]
    assert not (tmp_path / SWEEP / f"{dedupe.key(crashed)}.json").exists()
    holder.close(dedupe.FINISHED)

    # an agent killed before it settled (its lock gone with it): the next agent settles it as stopped
    left = {**PARAMS, "learning_rate": 0.2}
    os.close(handouts.record(tmp_path, SWEEP, "run00005", left).fd)
    handouts.settle_abandoned(tmp_path, SWEEP)
    assert (record(tmp_path, left)["state"], record(tmp_path, left)["run_id"]) == (ORPHANED, "run00005")
    assert not list(handouts.folder_of(tmp_path, SWEEP).glob("*.json"))


@pytest.mark.parametrize("dotenv, where", [("SWEEP_CLAIMS_DIR={claims}\n", "claims"),
                                           ("SWEEP_DEDUPE=false\n", None)])
def test_a_runs_claim_reads_the_dotenv_the_run_reads(tmp_path: Path, monkeypatch, dotenv: str, where: str | None):
    """`python -m app train` in a sweep: SWEEP_CLAIMS_DIR or SWEEP_DEDUPE set only in `.env` apply to the
    run's claim as to the rest of the run (a run refused by its own checks still claims, and frees, its values)."""
    from app import cli

    (tmp_path / ".env").write_text(dotenv.format(claims=tmp_path / "claims"))
    monkeypatch.chdir(tmp_path)
    for name in ("SWEEP_CLAIMS_DIR", "SWEEP_DEDUPE", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(name, "")  # unset (empty = unset), restored after
    for name, value in {"WANDB_DIR": str(tmp_path / "runs"), "WANDB_SWEEP_ID": SWEEP, "WANDB_RUN_ID": "run00009",
                        "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="epochs"):
        cli.cmd_train(["--learning_rate=0.01", "--batch_size=64", "--epochs=0"])
    values = {"learning_rate": "0.01", "batch_size": "64", "epochs": "0"}
    records = list(tmp_path.rglob(f"{dedupe.key(values)}.json"))
    if where is None:
        assert records == []  # dedupe off: no claim
    else:
        assert [p.parent.parent.name for p in records] == [where]  # not under WANDB_DIR/.sweep-claims
        assert json.loads(records[0].read_text())["state"] == dedupe.FAILED
