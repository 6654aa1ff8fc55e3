"""The container entrypoint's decisions, as functions of an environment dict (no Docker here)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app import preflight, sources
from app.container import entrypoint
from app.container.entrypoint import check_agent, check_gpu, choose_mode
from app.errors import UserError

KEY = "k" * 40


@pytest.fixture
def no_key(tmp_path: Path) -> dict[str, str]:
    return {"NETRC": str(tmp_path / "no-netrc")}


@pytest.mark.parametrize("environ, mode", [
    ({}, "run"),
    ({"SWEEP_ID": "e/p/abc"}, "agent"),
    ({"SWEEP_ID": "   "}, "run"),
    ({"SWEEP_CONFIG": "/app/sweeps/grid.yaml"}, "offline-sweep"),
    ({"SWEEP_ID": "e/p/abc", "SWEEP_CONFIG": "/app/sweeps/grid.yaml"}, "agent"),
    ({"APP_MODE": "run", "SWEEP_ID": "e/p/abc"}, "run"),
    ({"APP_MODE": " Agent "}, "agent"),
    ({"APP_MODE": "offline-sweep"}, "offline-sweep"),
    ({"APP_MODE": ""}, "run"),
    ({"APP_MODE": "auto"}, "run"),
])
def test_choose_mode(environ, mode):
    assert choose_mode(environ) == mode


def test_choose_mode_rejects_unknown_modes():
    with pytest.raises(UserError, match=r"APP_MODE='sweep' must be one of: auto, run, agent, offline-sweep"):
        choose_mode({"APP_MODE": "sweep"})


# --- GPU ---

@pytest.mark.parametrize("environ", [{}, {"DEVICE": "cuda"}, {"DEVICE": "cuda:1"}, {"ALLOW_CPU": "false"}])
def test_a_visible_gpu_needs_nothing_else(environ):
    assert check_gpu(environ, has_gpu=True) is None


@pytest.mark.parametrize("has_gpu", [True, False])
def test_device_cpu_never_needs_a_gpu(has_gpu):
    assert check_gpu({"DEVICE": "cpu"}, has_gpu) is None
    assert check_gpu({"DEVICE": " CPU "}, has_gpu) is None


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_requested_without_a_gpu(device):
    with pytest.raises(UserError, match=rf"DEVICE='{device}' but no GPU is visible.*--gpus all"):
        check_gpu({"DEVICE": device, "ALLOW_CPU": "true"}, has_gpu=False)


def test_no_gpu_refuses_unless_allowed():
    with pytest.raises(UserError, match="no GPU is visible in the container.*ALLOW_CPU=true"):
        check_gpu({}, has_gpu=False)
    with pytest.raises(UserError, match="ALLOW_CPU='perhaps' must be true or false"):
        check_gpu({"ALLOW_CPU": "perhaps"}, has_gpu=False)
    warning = check_gpu({"ALLOW_CPU": "true"}, has_gpu=False)
    assert warning and "training on the CPU" in warning and "\n" not in warning


# --- agent ---

def test_agent_command(no_key):
    command = check_agent({**no_key, "SWEEP_ID": "ent/proj/abc123", "WANDB_API_KEY": KEY})
    assert Path(command[0]).name == "wandb" and command[1] == "agent" and command[-1] == "ent/proj/abc123"
    assert "--count" not in command
    command = check_agent({**no_key, "SWEEP_ID": "abc123", "WANDB_API_KEY": KEY, "AGENT_COUNT": "3",
                           "AGENT_RUN_MODE": "offline"})
    assert command[-1] == "abc123"
    assert command[command.index("--count") + 1] == "3"


def test_agent_accepts_a_key_from_wandb_login(tmp_path: Path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    netrc.chmod(0o600)
    assert check_agent({"NETRC": str(netrc), "SWEEP_ID": "e/p/s"})[-1] == "e/p/s"


@pytest.mark.parametrize("environ, fragment", [
    ({}, "APP_MODE=agent needs SWEEP_ID"),
    ({"SWEEP_ID": "e/p"}, "SWEEP_ID='e/p' must be SWEEP or ENTITY/PROJECT/SWEEP"),
    ({"SWEEP_ID": "e//s"}, "must be SWEEP or ENTITY/PROJECT/SWEEP"),
    ({"SWEEP_ID": "/p/s"}, "must be SWEEP or ENTITY/PROJECT/SWEEP"),
    ({"SWEEP_ID": "e/p/s/x"}, "must be SWEEP or ENTITY/PROJECT/SWEEP"),
    ({"SWEEP_ID": "e/p/s", "WANDB_MODE": "offline"}, "cannot run offline"),
    ({"SWEEP_ID": "e/p/s", "WANDB_MODE": "dryrun"}, "cannot run offline"),
    ({"SWEEP_ID": "e/p/s", "WANDB_MODE": "disabled"}, "cannot run offline"),
    ({"SWEEP_ID": "e/p/s", "AGENT_RUN_MODE": "sometimes"}, "AGENT_RUN_MODE='sometimes' must be one of"),
    ({"SWEEP_ID": "e/p/s", "AGENT_COUNT": "0"}, "AGENT_COUNT='0' must be a positive integer"),
    ({"SWEEP_ID": "e/p/s", "AGENT_COUNT": "-1"}, "must be a positive integer"),
    ({"SWEEP_ID": "e/p/s", "AGENT_COUNT": "two"}, "must be a positive integer"),
    ({"SWEEP_ID": "e/p/s", "AGENT_OUTAGE_S": "0"}, "AGENT_OUTAGE_S='0' must be seconds above 0, at most 3600"),
    ({"SWEEP_ID": "e/p/s", "AGENT_OUTAGE_S": "2h"}, "AGENT_OUTAGE_S='2h' must be seconds above 0, at most 3600"),
])
def test_agent_errors(no_key, environ, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_agent({**no_key, "WANDB_API_KEY": KEY, **environ})


def test_agent_without_a_key(no_key):
    with pytest.raises(UserError, match="SWEEP_ID is set but there is no W&B API key"):
        check_agent({**no_key, "SWEEP_ID": "e/p/s"})


# --- folders: the agent modes check them with the runs' own preflight, before the agent starts ---

def check_folders(environ: dict[str, str]) -> None:
    preflight.check_environment(sources.load([], environ, dotenv_path=None), environ)


def test_check_folders_creates_the_defaults(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_folders({})
    assert (tmp_path / "outputs").is_dir()
    check_folders({"WANDB_DIR": str(tmp_path / "runs"), "OUTPUT_DIR": str(tmp_path / "out")})
    assert (tmp_path / "runs").is_dir() and (tmp_path / "out").is_dir()


@pytest.mark.parametrize("setting", ["WANDB_DIR", "OUTPUT_DIR"])
def test_check_folders_names_the_unwritable_one(tmp_path: Path, setting: str):
    (tmp_path / "file").write_text("")
    environ = {"WANDB_DIR": str(tmp_path / "runs"), "OUTPUT_DIR": str(tmp_path / "out"), setting: str(tmp_path / "file" / "x")}
    with pytest.raises(UserError, match=rf"^{setting}='.*/file/x' is not writable"):
        check_folders(environ)


# --- main(): exit codes; nothing here reaches exec or training ---

@pytest.fixture
def host(tmp_path: Path, monkeypatch, no_key) -> dict[str, str]:
    """A container environment on a host without GPUs, with writable folders."""
    monkeypatch.setattr(entrypoint, "gpus_visible", lambda: False)
    monkeypatch.chdir(tmp_path)  # the CLI reads ./.env: keep the repo's out of it
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield {**no_key, "WANDB_DIR": str(tmp_path / "runs"), "OUTPUT_DIR": str(tmp_path / "outputs")}
    for sig, handler in handlers.items():  # main() installs its stop handlers: give pytest its own back
        signal.signal(sig, handler)


@pytest.mark.parametrize("environ, argv, fragment", [
    ({"APP_MODE": "later"}, [], "APP_MODE='later' must be one of"),
    ({}, [], "no GPU is visible in the container"),
    ({"ALLOW_CPU": "maybe"}, [], "ALLOW_CPU='maybe' must be true or false"),
    ({"DEVICE": "cuda:0", "ALLOW_CPU": "true"}, [], "DEVICE='cuda:0' but no GPU is visible"),
    ({"ALLOW_CPU": "true", "WANDB_MODE": "online"}, [], "WANDB_MODE=online needs an API key"),
    ({"ALLOW_CPU": "true", "WANDB_MODE": "cloud"}, [], "WANDB_MODE='cloud' must be one of"),
    ({"ALLOW_CPU": "true"}, ["--epochs=0"], "epochs=0 must be >= 1"),  # passed on to `train`
    ({"ALLOW_CPU": "true", "SWEEP_ID": "e/p/s"}, [], "SWEEP_ID is set but there is no W&B API key"),
    ({"ALLOW_CPU": "true", "SWEEP_ID": "e/p/s", "WANDB_API_KEY": KEY, "WANDB_MODE": "offline"}, [], "cannot run offline"),
    ({"ALLOW_CPU": "true", "SWEEP_ID": "e/p/s", "WANDB_API_KEY": KEY}, ["--epochs=2"], "are not used by an agent"),
    ({"ALLOW_CPU": "true", "APP_MODE": "agent", "WANDB_API_KEY": KEY}, [], "APP_MODE=agent needs SWEEP_ID"),
])
def test_main_returns_2_with_one_line(host, capsys, environ, argv, fragment):
    assert entrypoint.main(argv, {**host, **environ}) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err


def test_main_unwritable_folder(host, capsys, tmp_path: Path):
    (tmp_path / "file").write_text("")
    assert entrypoint.main([], {**host, "ALLOW_CPU": "true", "WANDB_DIR": str(tmp_path / "file" / "runs")}) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: WANDB_DIR=") and "is not writable" in line


def test_main_unwritable_output_dir_even_without_a_gpu(host, capsys, tmp_path: Path):
    (tmp_path / "file").write_text("")
    assert entrypoint.main([], {**host, "OUTPUT_DIR": str(tmp_path / "file" / "out")}) == 2
    assert "OUTPUT_DIR=" in capsys.readouterr().err


# --- the agent as a child: a stop is passed on and reported as 128+signal; the GPU slot fd stays held ---

CHILD = """
import os, signal, sys, time
fd = int(sys.argv[1])
os.fstat(fd)  # the slot lock's descriptor was inherited (raises if it was closed)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))  # like wandb agent: exits on its own terms
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _run_child_in_subprocess(tmp_path: Path, sleep: float, stop: bool) -> subprocess.CompletedProcess:
    """run_child in a process of its own (it sets signal handlers), with an inheritable locked fd."""
    script = tmp_path / "parent.py"
    script.write_text(f"""
import fcntl, os, sys
from app.container import entrypoint
fd = os.open({str(tmp_path / 'slot.lock')!r}, os.O_RDONLY | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.set_inheritable(fd, True)
sys.exit(entrypoint.run_child([sys.executable, "-c", {CHILD!r}, str(fd), "{sleep}"], dict(os.environ)))
""")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).parents[1], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    if stop:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_run_child_finished_is_the_childs_exit_code(tmp_path: Path):
    proc = _run_child_in_subprocess(tmp_path, 0.1, stop=False)
    assert proc.returncode == 0, proc.stderr


def test_run_child_stopped_is_143_and_passes_the_signal_on(tmp_path: Path):
    proc = _run_child_in_subprocess(tmp_path, 30, stop=True)
    assert proc.returncode == 143, proc.stderr  # the child's own 7 is not what the container reports
    assert "agent stopped by SIGTERM" in proc.stderr and "Traceback" not in proc.stderr
