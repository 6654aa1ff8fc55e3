"""`python -m app ...` as a user runs it: help, one-line errors with exit 2, and the W&B modes."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LAYERED_RUN_ID, clean_env, error_lines, run_app

from app import runlog, tracking
from app.config import KEYS, Config
from app.errors import UserError


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2 and exactly one line on stderr, starting with `error:`, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# --- help ---

def test_help_lists_the_commands(env, tmp_path: Path):
    proc = run_app(["--help"], env, tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "usage: python -m app <command>" in proc.stdout
    for command in ("train", "sweep", "offline-agent", "sync"):
        assert f"\n  {command} " in proc.stdout
    assert "WANDB_MODE" in proc.stdout


def test_no_command_prints_usage_and_fails(env, tmp_path: Path):
    proc = run_app([], env, tmp_path)
    assert proc.returncode == 2 and "usage: python -m app <command>" in proc.stdout


def test_unknown_command(env, tmp_path: Path):
    assert "unknown command 'trian'" in _one_error_line(run_app(["trian"], env, tmp_path))


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_lists_every_key_with_its_default(env, tmp_path: Path, flag: str):
    proc = run_app(["train", flag], env, tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    defaults = Config().to_dict()
    for key in KEYS:
        assert f"--{key}={json.dumps(defaults[key])} " in proc.stdout
    assert "--epochs=5" in proc.stdout and "--kernels=[16, 32]" in proc.stdout
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "outputs").exists()


# --- every bad input: one line, exit 2, nothing started ---

@pytest.mark.parametrize("args, environ, dotenv, fragment", [
    (["--epochs=0"], {}, "", "epochs=0 must be >= 1"),
    (["--epoch=1"], {}, "", "unknown option --epoch"),
    (["epochs=1"], {}, "", "unexpected argument 'epochs=1'"),
    (["--epochs"], {}, "", "--epochs needs a value"),
    (["--kernels=16,x"], {}, "", "is not a list of integers"),
    (["--dataset=cifar10"], {}, "", "must be one of: mnist, fashion_mnist"),
    ([], {"LEARNING_RATE": "fast"}, "", "learning_rate='fast' (from environment) is not a number"),
    ([], {}, "BATCH_SIZE=big\n", "batch_size='big' (from .env) is not an integer"),
    ([], {"WANDB_MODE": "sometimes"}, "", "WANDB_MODE='sometimes' must be one of: online, offline, disabled"),
], ids=["range", "unknown-option", "positional", "missing-value", "kernels", "choice", "env-type", "dotenv-type",
        "wandb-mode"])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, small_data: Path, args, environ, dotenv, fragment):
    if dotenv:
        (tmp_path / ".env").write_text(dotenv)
    env = clean_env(tmp_path, DATA_DIR=str(small_data), OUTPUT_DIR=str(tmp_path / "outputs"),
                    WANDB_DIR=str(tmp_path / "runs"), **environ)
    assert fragment in _one_error_line(run_app(["train", *args], env, tmp_path))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists()


def test_online_without_a_key_fails_before_any_work(tmp_path: Path):
    """No download attempt, no folder, no W&B run: the mode is checked first."""
    env = clean_env(tmp_path, WANDB_MODE="online", DATA_DIR=str(tmp_path / "data"),
                    OUTPUT_DIR=str(tmp_path / "outputs"), WANDB_DIR=str(tmp_path / "runs"))
    line = _one_error_line(run_app(["train"], env, tmp_path, timeout=60))
    assert "WANDB_MODE=online needs an API key" in line
    assert not any((tmp_path / d).exists() for d in ("data", "outputs", "runs", "wandb"))


@pytest.mark.parametrize("setting", ["WANDB_DIR", "OUTPUT_DIR"])
def test_unwritable_folder(tmp_path: Path, small_data: Path, setting: str):
    # a path below a regular file can't be created even by root (the tests run as root in CI)
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "sub"
    folders = {"WANDB_DIR": str(tmp_path / "runs"), "OUTPUT_DIR": str(tmp_path / "outputs"), setting: str(bad)}
    env = clean_env(tmp_path, WANDB_MODE="offline", DATA_DIR=str(small_data), **folders)
    line = _one_error_line(run_app(["train"], env, tmp_path, timeout=60))
    assert f"{setting}={str(bad)!r} is not writable" in line
    assert not (tmp_path / "wandb").exists()  # W&B did not fall back to another folder
    assert not list(tmp_path.glob("**/offline-run-*"))


def test_missing_data_without_network_is_one_line_and_quick(tmp_path: Path):
    env = clean_env(tmp_path, WANDB_MODE="offline", DATA_DIR=str(tmp_path / "data"),
                    OUTPUT_DIR=str(tmp_path / "outputs"), WANDB_DIR=str(tmp_path / "runs"))
    start = time.monotonic()
    line = _one_error_line(run_app(["train", "--dataset=mnist"], env, tmp_path, timeout=60))
    assert time.monotonic() - start < 30
    assert str(tmp_path / "data" / "MNIST" / "raw") in line and "train-images-idx3-ubyte" in line
    assert not list(tmp_path.glob("**/offline-run-*"))  # no W&B run for a job that never started


def test_unknown_sweep_key_fails_and_the_run_is_marked_failed(tmp_path: Path, small_data: Path):
    params = tmp_path / "config-sweep1.yaml"
    params.write_text("wandb_version: 1\n\nlearning_rate:\n  value: 0.01\ndropout:\n  value: 0.5\n")
    env = clean_env(tmp_path, DATA_DIR=str(small_data), OUTPUT_DIR=str(tmp_path / "outputs"), VAL_SIZE="200",
                    WANDB_DIR=str(tmp_path / "runs"), WANDB_RUN_ID="sweep1", WANDB_SWEEP_ID="s",
                    WANDB_SWEEP_PARAM_PATH=str(params))
    # a sweep command without ${args} (or with keys the CLI would also refuse): only the sweep layer sees it
    proc = run_app(["train", "--epochs=1"], env, tmp_path, timeout=90)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)  # W&B has printed its own lines by then; ours is the one error
    assert "unknown config key 'dropout' (from W&B sweep)" in line
    [folder] = runlog.find(tmp_path / "runs")
    assert runlog.read(folder).exit_code not in (None, 0), "a run that failed must not be recorded as a success"
    assert not (tmp_path / "outputs" / "sweep1" / "checkpoint.pt").exists()


# --- W&B modes ---

def test_no_key_no_mode_runs_offline_and_says_how_to_sync(layered_run):
    cwd, proc = layered_run
    [folder] = runlog.find(cwd / "runs")
    assert folder.name.startswith("offline-run-")
    hints = [line for line in proc.stderr.splitlines() if line.strip().startswith("upload it with: python -m app sync ")]
    assert hints, proc.stderr[-3000:]
    command = shlex.split(hints[0].split(":", 1)[1])
    assert (cwd / command[4]).resolve() == folder.resolve()
    assert str(folder.relative_to(cwd)) in proc.stderr.split("upload it with")[0]  # where the run is
    # the printed command is the real one: it finds the run there (dry run, nothing leaves the machine)
    dry = run_app(["sync", "--dry-run", *command[4:]], clean_env(cwd), cwd)
    assert dry.returncode == 0 and "found 1 offline run(s)" in dry.stdout and "1 to upload" in dry.stdout, dry.stdout + dry.stderr
    assert folder.name in dry.stdout.splitlines()[-1]  # the `wandb sync` it would run names this run


def test_plain_progress_lines_when_not_a_terminal(layered_run):
    _, proc = layered_run
    assert "\r" not in proc.stdout  # no tqdm bar in a log
    assert "epoch 1/1 done: val_loss" in proc.stdout
    assert f"done: run {LAYERED_RUN_ID} test_accuracy" in proc.stdout


def test_disabled_mode_trains_without_a_run(tmp_path: Path, small_data: Path):
    env = clean_env(tmp_path, WANDB_MODE="disabled", DATA_DIR=str(small_data), OUTPUT_DIR=str(tmp_path / "outputs"),
                    WANDB_DIR=str(tmp_path / "runs"), WANDB_RUN_ID="disabled1", VAL_SIZE="200", EPOCHS="1")
    proc = run_app(["train"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "outputs" / "disabled1" / "model.onnx").is_file()
    assert not list(tmp_path.glob("**/run-*.wandb")) and "wandb sync" not in proc.stderr


@pytest.mark.parametrize("environ, mode", [
    ({}, "offline"),
    ({"WANDB_API_KEY": "k" * 40}, "online"),
    ({"WANDB_API_KEY": "  "}, "offline"),
    ({"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}, "offline"),
    ({"WANDB_MODE": "dryrun"}, "offline"),
    ({"WANDB_MODE": " Disabled "}, "disabled"),
])
def test_resolve_mode(tmp_path: Path, environ, mode):
    assert tracking.resolve_mode({"NETRC": str(tmp_path / "none"), **environ}) == mode


def test_a_key_from_wandb_login_counts(tmp_path: Path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine wandb.example.com\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert tracking.resolve_mode({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"}) == "online"
    assert tracking.resolve_mode({"NETRC": str(netrc)}) == "offline"  # a key for another host is no key


@pytest.mark.parametrize("environ, fragment", [
    ({"WANDB_MODE": "online"}, "WANDB_MODE=online needs an API key"),
    ({"WANDB_MODE": "cloud"}, "WANDB_MODE='cloud' must be one of"),
])
def test_resolve_mode_errors(tmp_path: Path, environ, fragment):
    with pytest.raises(UserError, match=fragment):
        tracking.resolve_mode({"NETRC": str(tmp_path / "none"), **environ})


def test_check_writable(tmp_path: Path):
    tracking.check_writable(tmp_path / "new" / "deep", "OUTPUT_DIR")
    assert (tmp_path / "new" / "deep").is_dir() and not list((tmp_path / "new" / "deep").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^OUTPUT_DIR='.*/file/x' is not writable \(.*\); mount or choose"):
        tracking.check_writable(tmp_path / "file" / "x", "OUTPUT_DIR")


def test_prepare_reads_dotenv_once_under_the_real_environment(tmp_path: Path, small_data: Path, monkeypatch):
    """.env's W&B settings apply as if exported, the real environment wins, empty values are unset,
    and the checks ran once: the W&B mode is resolved and both folders exist."""
    from app import runner

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("WANDB_PROJECT=from-dotenv\nWANDB_ENTITY=from-dotenv\nEPOCHS=3\nSEED=4\n")
    environ = {"NETRC": str(tmp_path / "none"), "WANDB_ENTITY": "from-env", "WANDB_MODE": "", "SEED": "",
               "WANDB_DIR": str(tmp_path / "runs"), "OUTPUT_DIR": str(tmp_path / "out"), "DATA_DIR": str(small_data)}
    start = runner.prepare(["--seed=9"], environ)
    assert (start.config.epochs, start.config.seed) == (3, 9)
    assert environ["WANDB_PROJECT"] == "from-dotenv" and environ["WANDB_ENTITY"] == "from-env"
    assert "WANDB_MODE" not in environ  # empty: dropped before W&B could reject it
    assert start.ready.mode == "offline"  # no key anywhere
    assert (tmp_path / "runs").is_dir() and (tmp_path / "out").is_dir()


def test_a_sweep_run_leaves_project_and_id_to_the_agent(layered_run):
    """W&B warns "Ignoring project ... when running a sweep" when wandb.init is given them in a sweep run."""
    _, proc = layered_run
    assert "Ignoring" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert LAYERED_RUN_ID in proc.stdout  # the run still has the id the agent gave it


def test_our_upload_line_comes_after_wandbs_own_and_wandbs_footer_is_quiet(layered_run):
    """W&B's footer offers `wandb sync offline-run-...`, which uploads the run without its model artifact:
    it is not printed, and our command comes after everything W&B prints."""
    _, proc = layered_run
    assert "wandb sync" not in proc.stdout + proc.stderr.split("upload it with")[0]
    assert "Run summary" not in proc.stdout + proc.stderr  # W&B's per-run summary panel: off unless asked for
    tail = proc.stderr.rstrip().splitlines()[-2:]
    assert tail[0].startswith("W&B offline run saved in ") and "upload it with: python -m app sync" in tail[1], tail
