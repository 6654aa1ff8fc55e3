"""Fault matrix: settings, environment values and modes a user gets wrong, through `python -m app` and
the container entrypoint run on the host, as a user starts them.

Each refusal: exit 2, exactly one `error:` line naming the setting, no traceback, and nothing on disk
(no W&B run folder to sync, no run folder under OUTPUT_DIR). Signals: one line, 128+signal, and every
W&B run that was opened has its exit record. Also: run ids that are not one safe name, damaged data
files and absent devices refused before W&B opens a run, sweep ranges reaching bad values, GPU slot
settings refused before a sweep's storage exists, stops during the export or the data's unpacking, and
run folders that are files or read-only. Run: pytest -q tests/test_faults_settings.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, clean_env, error_lines, run_app
from idx import write_dataset, write_idx

from app import runlog
from app.data import FILES

KEY = "k" * 40


@pytest.fixture(scope="module")
def bad_labels(tmp_path_factory) -> Path:
    """A 10-class-sized dataset whose training labels include 12 (a labels file from another task)."""
    root = tmp_path_factory.mktemp("bad-labels")
    arrays = write_dataset(root, "mnist", n_train=600, n_test=100)
    labels = arrays[FILES[1]].copy()
    labels[7] = 12
    write_idx(root / "MNIST" / "raw" / FILES[1], labels)
    return root


@pytest.fixture(scope="module")
def foreign_labels(tmp_path_factory) -> Path:
    """A labels file that is not IDX (wrong magic number)."""
    root = tmp_path_factory.mktemp("foreign-labels")
    write_dataset(root, "mnist", n_train=600, n_test=100)
    (root / "MNIST" / "raw" / FILES[3]).write_bytes(b"\x00\x00\x09\x99" + bytes(104))
    return root


def _env(tmp: Path, data: Path, **extra: str) -> dict[str, str]:
    base = dict(DATA_DIR=str(data), WANDB_DIR=str(tmp / "runs"), OUTPUT_DIR=str(tmp / "outputs"),
                VAL_SIZE="100", TRAIN_STRIDE="10", EPOCHS="1", WATCH_LOG="none")
    return clean_env(tmp, **{**base, **extra})


def _nothing_on_disk(tmp: Path) -> None:
    runs = list((tmp / "runs").glob("wandb/*run-*")) if (tmp / "runs").exists() else []
    assert not runs, f"a W&B run was left for a refused setting: {runs}"
    outputs = list((tmp / "outputs").iterdir()) if (tmp / "outputs").exists() else []
    assert not outputs, f"a run folder was left: {outputs}"


def _one_refusal(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-3000:]
    assert len(errors[0]) < 400, errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout


# --- class 1: settings that pass the type checks but can't work; class 2: empty and odd values ---
# (args, environment, .env text, data fixture name, the error's fragment)
TRAIN_CASES = {
    "lr-inf": (["--learning_rate=inf"], {}, "", "small_data", "learning_rate=inf must be > 0 and finite"),
    "lr-nan": (["--learning_rate=nan"], {}, "", "small_data", "learning_rate=nan must be > 0 and finite"),
    "lr-minus-inf": (["--learning_rate=-inf"], {}, "", "small_data", "learning_rate=-inf must be > 0"),
    "lr-overflow-env": ([], {"LEARNING_RATE": "1e999"}, "", "small_data", "learning_rate=inf must be > 0 and finite"),
    "gpu-fraction-nan": (["--gpu_memory_fraction=nan"], {}, "", "small_data", "gpu_memory_fraction=nan must be between 0 and 1"),
    "classes-3": (["--classes=3"], {}, "", "small_data", "classes=3 but"),
    "classes-9": ([], {"CLASSES": "9"}, "", "small_data", "has label 9: classes must be at least 10"),
    "label-beyond-classes": ([], {}, "", "bad_labels", "has label 12: classes must be at least 13"),
    "labels-not-idx": ([], {}, "", "foreign_labels", "is not a valid IDX label file"),
    "val-size-whole-set": (["--val_size=1200", "--train_stride=1"], {}, "", "small_data",
                           "val_size=1200 must be smaller than the 1200 training images"),
    "val-size-default-on-small-data": ([], {"VAL_SIZE": "5000"}, "", "small_data", "val_size=5000 must be at most"),
    "stride-past-the-set": (["--train_stride=5000"], {}, "", "small_data",
                            "train_stride=5000 is more than the 1200 training images"),
    "kernels-4-blocks": (["--kernels=8,16,32,64"], {}, "", "small_data", "kernels=[8, 16, 32, 64] must be 1 to 3"),
    "device-odd-digit": (["--device=cuda:²"], {}, "", "small_data", "device='cuda:²' must be auto, cpu, cuda or cuda:N"),
    "huge-value-cut-short": ([f"--epochs={'9' * 100_000}"], {}, "", "small_data", "is not an integer"),
    "empty-values-are-unset": ([], {"EPOCHS": "", "SEED": " ", "LEARNING_RATE": "inf"}, "", "small_data",
                               "learning_rate=inf"),
    "dotenv-typo": ([], {}, "EPOCH=3\n", "small_data", ".env:1: unknown setting EPOCH; did you mean EPOCHS?"),
    "dotenv-typo-2": ([], {}, "SEED=1\nLERNING_RATE=0.1\n", "small_data", ".env:2: unknown setting LERNING_RATE"),
    "dotenv-broken-line": ([], {}, "SEED=1\nepochs 3\n", "small_data", ".env:2: 'epochs 3' is not a KEY=value line"),
    "dotenv-open-quote": ([], {}, "EPOCHS='3\n", "small_data", "is not a KEY=value line"),
    "dotenv-bad-value": ([], {}, "EPOCHS=many\n", "small_data", "epochs='many' (from .env) is not an integer"),
    "dotenv-lr-inf": ([], {}, "LEARNING_RATE=inf\n", "small_data", "learning_rate=inf must be > 0 and finite"),
    # far out of range or in Python's own number forms: passed, then an allocation or overflow traceback
    "kernels-huge": ([], {"KERNELS": "100000"}, "", "small_data", "kernels=[100000] must be channel counts of at most 1024"),
    "classes-huge": ([], {}, "CLASSES=1000000000\n", "small_data", "classes=1000000000 must be at most 100000"),
    "seed-past-64-bits": ([f"--seed={2**64}"], {}, "", "small_data", f"seed={2**64} must be a 64-bit integer"),
    "epochs-python-form": ([], {"EPOCHS": "1_000"}, "", "small_data", "epochs='1_000' (from environment) is not an integer"),
    "wandb-mode-odd": ([], {"WANDB_MODE": "cloud"}, "", "small_data", "WANDB_MODE='cloud' must be one of"),
    "wandb-mode-online-no-key": ([], {"WANDB_MODE": "online"}, "", "small_data", "WANDB_MODE=online needs an API key"),
    "dotenv-wandb-online-no-key": ([], {}, "WANDB_MODE=online\n", "small_data", "WANDB_MODE=online needs an API key"),
}


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_train_refuses_in_one_line_before_any_run(request, tmp_path: Path, case: str):
    args, environ, dotenv, data, fragment = TRAIN_CASES[case]
    if dotenv:
        (tmp_path / ".env").write_text(dotenv)
    proc = run_app(["train", *args], _env(tmp_path, request.getfixturevalue(data), **environ), tmp_path)
    _one_refusal(proc, fragment)
    _nothing_on_disk(tmp_path)


def test_a_binary_dotenv_is_one_line(tmp_path: Path, small_data: Path):
    (tmp_path / ".env").write_bytes(bytes(range(256)))
    _one_refusal(run_app(["train"], _env(tmp_path, small_data), tmp_path), ".env is not a text file")
    _nothing_on_disk(tmp_path)


@pytest.mark.parametrize("command", [
    ["sweep", "create", "sweeps/grid.yaml"],
    ["offline-agent"],  # SWEEP_CONFIG from .env
    ["launch", "--agents", "1", "--cpu", "--env-file", ".env"],
], ids=["sweep-create", "offline-agent", "launch"])
def test_every_command_that_reads_dotenv_checks_it(tmp_path: Path, small_data: Path, command: list[str]):
    (tmp_path / ".env").write_text("SWEEP_CONFIG=sweeps/grid.yaml\nEPOCH=3\n")
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "grid.yaml").write_text((REPO / "sweeps" / "grid.yaml").read_text())
    _one_refusal(run_app(command, _env(tmp_path, small_data), tmp_path), ".env:2: unknown setting EPOCH; did you mean EPOCHS?")
    _nothing_on_disk(tmp_path)


# --- class 3: every container mode checks the training settings before it starts anything ---

def run_entrypoint(env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.container.entrypoint"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


AGENT = {"SWEEP_ID": "ent/proj/sweep1", "WANDB_API_KEY": KEY, "ALLOW_CPU": "true"}
ENTRY_CASES = {
    "agent-epochs-many": ({**AGENT, "EPOCHS": "many"}, "epochs='many' (from environment) is not an integer"),
    "agent-lr-inf": ({**AGENT, "LEARNING_RATE": "inf"}, "learning_rate=inf must be > 0 and finite"),
    "agent-classes-vs-data": ({**AGENT, "CLASSES": "4"}, "classes=4 but"),
    "agent-val-size-vs-data": ({**AGENT, "VAL_SIZE": "5000"}, "val_size=5000 must be at most"),
    "agent-offline-mode": ({**AGENT, "WANDB_MODE": "offline"}, "cannot run offline"),
    "agent-run-mode-odd": ({**AGENT, "AGENT_RUN_MODE": "later"}, "AGENT_RUN_MODE='later' must be one of"),
    "agent-count-zero": ({**AGENT, "AGENT_COUNT": "0"}, "AGENT_COUNT='0' must be a positive integer"),
    "agent-process-odd": ({**AGENT, "AGENT_PROCESS": "lukewarm"}, "AGENT_PROCESS='lukewarm' must be one of: per-run, warm"),
    "agent-stagger-odd": ({**AGENT, "AGENT_START_STAGGER": "soon"}, "AGENT_START_STAGGER='soon'"),
    "agent-allow-cpu-odd": ({**AGENT, "ALLOW_CPU": "maybe"}, "ALLOW_CPU='maybe' must be true or false"),
    "agent-no-key": ({"SWEEP_ID": "e/p/s", "ALLOW_CPU": "true"}, "there is no W&B API key"),
    "run-epochs-many": ({"ALLOW_CPU": "true", "EPOCHS": "many"}, "epochs='many' (from environment) is not an integer"),
    "run-classes-vs-data": ({"ALLOW_CPU": "true", "CLASSES": "2"}, "classes=2 but"),
    "app-mode-odd": ({"APP_MODE": "later", "ALLOW_CPU": "true"}, "APP_MODE='later' must be one of"),
    "offline-sweep-folder": ({"SWEEP_CONFIG": "{tmp}", "ALLOW_CPU": "true"}, "is a folder"),
    "offline-sweep-binary": ({"SWEEP_CONFIG": sys.executable, "ALLOW_CPU": "true"}, "is not a text file"),
    "offline-sweep-missing": ({"SWEEP_CONFIG": "{tmp}/none.yaml", "ALLOW_CPU": "true"}, "does not exist"),
    "offline-sweep-classes-vs-data": ({"SWEEP_CONFIG": str(Path(__file__).parents[1] / "sweeps" / "grid.yaml"),
                                       "ALLOW_CPU": "true", "CLASSES": "5"}, "classes=5 but"),
    "offline-sweep-epochs-many": ({"SWEEP_CONFIG": str(Path(__file__).parents[1] / "sweeps" / "grid.yaml"),
                                   "ALLOW_CPU": "true", "EPOCHS": "many"}, "epochs='many'"),
}


@pytest.mark.parametrize("case", ENTRY_CASES, ids=list(ENTRY_CASES))
def test_every_container_mode_checks_before_it_starts(tmp_path: Path, small_data: Path, case: str):
    environ, fragment = ENTRY_CASES[case]
    environ = {k: v.replace("{tmp}", str(tmp_path)) for k, v in environ.items()}
    proc = run_entrypoint(_env(tmp_path, small_data, **environ), tmp_path)
    _one_refusal(proc, fragment)
    assert "starting: " not in proc.stdout  # `wandb agent` never started
    _nothing_on_disk(tmp_path)
    assert not (tmp_path / "runs" / "sweeps").exists() or not any((tmp_path / "runs" / "sweeps").iterdir())


# --- class 8: signals at the edges; class 10: where the end-of-run hint points ---

def _exit_codes(runs: Path) -> list[int | None]:
    """Each W&B run's recorded exit code under runs/ (None: no exit record), read from its run log."""
    return [runlog.read(folder).exit_code for folder in runlog.find(runs)] if runs.exists() else []


def _start(tmp: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app", "train"], env=env, cwd=tmp, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigint_during_start_up_is_one_line_and_130(tmp_path: Path, small_data: Path):
    proc = _start(tmp_path, _env(tmp_path, small_data))
    time.sleep(1.0)  # importing torch and W&B: well before the first training step
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "stopped by SIGINT" in err
    assert None not in _exit_codes(tmp_path / "runs")


def test_sigterm_while_wandb_starts_leaves_a_run_with_its_exit_record(tmp_path: Path, small_data: Path):
    proc = _start(tmp_path, _env(tmp_path, small_data))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob("wandb/*run-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err, err[-3000:]
    assert _exit_codes(tmp_path / "runs") == [143]
    (folder,) = runlog.find(tmp_path / "runs")
    assert runlog.read(folder).preempting  # a sweep requeues it: its values are not lost


def test_sigterm_after_done_exits_0_and_the_container_hint_names_the_host(tmp_path: Path, small_data: Path):
    # also: WANDB_MODE= (empty, in the environment and in .env) is unset, not a W&B settings error
    (tmp_path / ".env").write_text("WANDB_MODE=\n")
    env = _env(tmp_path, small_data, WANDB_MODE="", APP_IN_CONTAINER="1", RUNS_DIR_HOST="./my-runs")
    proc = _start(tmp_path, env)
    for line in proc.stdout:
        if line.startswith("done: "):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and not error_lines(err)
    hint = [line for line in err.splitlines() if "upload it on the host with" in line]
    assert hint and "python -m app sync ./my-runs" in hint[0], err[-2000:]
    # plain `wandb sync` from the folder that holds the run: from elsewhere it drops the model artifact
    assert "(or: cd my-runs/wandb && wandb sync offline-run-" in hint[0], hint[0]
    assert f"wandb sync {tmp_path}" not in err.split("W&B offline run saved")[-1]  # no path from inside
    assert _exit_codes(tmp_path / "runs") == [0]


def test_refused_settings_leave_earlier_runs_alone(tmp_path: Path, small_data: Path):
    """A refusal after a finished run changes nothing in the runs and outputs folders."""
    env = _env(tmp_path, small_data)
    assert run_app(["train"], env, tmp_path).returncode == 0
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    _one_refusal(run_app(["train", "--classes=5"], env, tmp_path), "classes=5 but")
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert after == before


# --- the run id names a folder: WANDB_RUN_ID is checked before any work (W&B's rules, one path component) ---
RUN_ID_CASES = {
    "parent": "..",
    "here": ".",
    "climbs-out": "../../x",
    "two-components": "a/b",
    "backslash": "a\\b",
    "too-long": "r" * 300,
    "just-over-the-bound": "r" * 65,
    "wandb-reserved-colon": "run:1",
    "wandb-reserved-semicolon": "run;1",
    "wandb-reserved-comma": "run,1",
    "wandb-reserved-hash": "run#1",
    "wandb-reserved-question": "run?1",
    "wandb-reserved-quote": "run'1",
    "inner-space": "my run",
    "newline": "run\n1",
    "hidden-file": ".hidden",
    "leading-dash": "-rf",
    "non-ascii": "rün1",
}


@pytest.mark.parametrize("case", RUN_ID_CASES, ids=list(RUN_ID_CASES))
def test_a_run_id_that_is_not_one_safe_name_is_refused(tmp_path: Path, small_data: Path, case: str):
    (tmp_path / "outputs").mkdir()
    proc = run_app(["train"], _env(tmp_path, small_data, WANDB_RUN_ID=RUN_ID_CASES[case]), tmp_path)
    _one_refusal(proc, "WANDB_RUN_ID=")
    _nothing_on_disk(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not {"checkpoint.pt", "model.onnx", "x"} & set(left), left  # nothing written beside OUTPUT_DIR


def test_the_container_run_mode_checks_the_run_id(tmp_path: Path, small_data: Path):
    proc = run_entrypoint(_env(tmp_path, small_data, ALLOW_CPU="true", WANDB_RUN_ID=".."), tmp_path)
    _one_refusal(proc, "WANDB_RUN_ID='..'")
    _nothing_on_disk(tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


# --- data files and the device are checked before W&B opens a run; the message names the file ---
def _damage(path: Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "wrong-magic":
        path.write_bytes(b"\x00\x00\x08\x01" + blob[4:])  # a label file's magic on an image file
    elif how == "header-only":
        path.write_bytes(blob[:16])
    elif how == "one-image-short":  # a whole image fewer than the header says
        path.write_bytes(blob[: len(blob) - 28 * 28])
    elif how == "other-size":  # 32x32 images where 28x28 belong
        write_idx(path, np.zeros((int.from_bytes(blob[4:8], "big"), 32, 32), np.uint8))
    elif how == "fewer-images-than-labels":
        n = int.from_bytes(blob[4:8], "big") - 10
        write_idx(path, np.frombuffer(blob[16:16 + n * 784], np.uint8).reshape(n, 28, 28))


DATA_CASES = [(f, how) for f in (FILES[0], FILES[2])
              for how in ("truncated", "empty", "wrong-magic", "header-only", "one-image-short", "other-size",
                          "fewer-images-than-labels")]


@pytest.mark.parametrize("name, how", DATA_CASES, ids=[f"{f.split('-')[0]}-{how}" for f, how in DATA_CASES])
def test_a_bad_image_file_is_refused_before_any_run(tmp_path: Path, name: str, how: str):
    data = tmp_path / "data"
    write_dataset(data, "mnist", n_train=600, n_test=100)
    path = data / "MNIST" / "raw" / name
    _damage(path, how)
    proc = run_app(["train"], _env(tmp_path, data, VAL_SIZE="50"), tmp_path)
    _one_refusal(proc, str(path))
    _nothing_on_disk(tmp_path)


def test_a_truncated_archive_is_refused_naming_it(tmp_path: Path):
    data = tmp_path / "data"
    write_dataset(data, "mnist", n_train=600, n_test=100, gz=True)
    archive = data / "MNIST" / "raw" / f"{FILES[2]}.gz"
    archive.write_bytes(archive.read_bytes()[:200])
    _one_refusal(run_app(["train"], _env(tmp_path, data, VAL_SIZE="50"), tmp_path), str(archive))
    _nothing_on_disk(tmp_path)
    assert not list((data / "MNIST" / "raw").glob(".*.part"))


@pytest.mark.parametrize("device", ["cuda:7", "cuda"])
def test_a_device_that_is_not_there_is_refused_before_any_run(tmp_path: Path, small_data: Path, device: str):
    if __import__("torch").cuda.is_available():
        pytest.skip("this host has CUDA: the refusal needs a device index it lacks")  # never in CI (no GPU)
    _one_refusal(run_app(["train", f"--device={device}"], _env(tmp_path, small_data), tmp_path), f"device={device!r}")
    _nothing_on_disk(tmp_path)


# --- a sweep's ranges: every value a range can produce is a valid setting, or `sweep validate` refuses ---
SWEEP_HEAD = "method: random\nmetric: {name: val_loss, goal: minimize}\nparameters:\n"
RANGE_CASES = {
    "lr-below-0": ("learning_rate: {distribution: uniform, min: -0.1, max: 0.1}", "learning_rate=-0.1"),
    "lr-at-0": ("learning_rate: {distribution: uniform, min: 0.0, max: 0.1}", "learning_rate=0.0"),
    "lr-inferred-range-at-0": ("learning_rate: {min: 0.0, max: 0.01}", "learning_rate=0.0"),
    "batch-through-0": ("batch_size: {distribution: int_uniform, min: -16, max: 64}", "batch_size=-16"),
    "batch-from-0": ("batch_size: {min: 0, max: 64}", "batch_size=0"),
    "batch-q-rounds-to-0": ("batch_size: {distribution: q_uniform, min: 1, max: 64, q: 8}", "batch_size=0"),
    "epochs-from-0": ("epochs: {distribution: int_uniform, min: 0, max: 3}", "epochs=0"),
    "gpu-fraction-past-1": ("gpu_memory_fraction: {distribution: uniform, min: 0.5, max: 1.5}", "gpu_memory_fraction=1.5"),
    "lr-log-past-float": ("learning_rate: {distribution: log_uniform, min: -5, max: 1000}", "learning_rate=inf"),
}


@pytest.mark.parametrize("case", RANGE_CASES, ids=list(RANGE_CASES))
def test_sweep_validate_refuses_a_range_reaching_bad_values(tmp_path: Path, case: str):
    text, fragment = RANGE_CASES[case]
    (tmp_path / "s.yaml").write_text(SWEEP_HEAD + "  " + text + "\n")
    proc = run_app(["sweep", "validate", "s.yaml"], clean_env(tmp_path), tmp_path)
    _one_refusal(proc, fragment)
    assert "parameters." in error_lines(proc.stderr)[0]


@pytest.mark.parametrize("text", [
    "learning_rate: {distribution: log_uniform_values, min: 0.0001, max: 0.1}",
    "batch_size: {distribution: q_uniform, min: 16, max: 128, q: 16}",
    "learning_rate: {distribution: normal, mu: 0.01, sigma: 0.001}",  # unbounded: each draw is checked as it comes
])
def test_sweep_validate_accepts_ranges_inside_the_settings(tmp_path: Path, text: str):
    (tmp_path / "s.yaml").write_text(SWEEP_HEAD + "  " + text + "\n")
    proc = run_app(["sweep", "validate", "s.yaml"], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- GPU slot settings are refused before an offline sweep's storage (its journal) is created ---
GRID = str(Path(__file__).parents[1] / "sweeps" / "grid.yaml")
GPU_CASES = {
    "gpu-count-word": ({"GPU_COUNT": "two"}, "GPU_COUNT='two'"),
    "gpu-count-negative": ({"GPU_COUNT": "-1"}, "GPU_COUNT='-1'"),
    "agents-per-gpu-zero": ({"GPU_COUNT": "1", "AGENTS_PER_GPU": "0"}, "AGENTS_PER_GPU='0'"),
    "agents-per-gpu-word": ({"GPU_COUNT": "2", "AGENTS_PER_GPU": "many"}, "AGENTS_PER_GPU='many'"),
    "agents-per-gpu-odd-without-gpu": ({"AGENTS_PER_GPU": "1.5"}, "AGENTS_PER_GPU='1.5'"),
    "slots-dir-a-file": ({"GPU_COUNT": "1", "GPU_SLOTS_DIR": "{tmp}/slots-file"}, "GPU_SLOTS_DIR="),
    "slots-dir-under-a-file": ({"GPU_COUNT": "1", "GPU_SLOTS_DIR": "{tmp}/slots-file/sub"}, "GPU_SLOTS_DIR="),
}


@pytest.mark.parametrize("case", GPU_CASES, ids=list(GPU_CASES))
def test_gpu_slot_mistakes_are_refused_before_the_sweep_storage_exists(tmp_path: Path, small_data: Path, case: str):
    environ, fragment = GPU_CASES[case]
    (tmp_path / "slots-file").write_text("not a folder")
    environ = {k: v.replace("{tmp}", str(tmp_path)) for k, v in environ.items()}
    proc = run_entrypoint(_env(tmp_path, small_data, SWEEP_CONFIG=GRID, ALLOW_CPU="true", **environ), tmp_path)
    _one_refusal(proc, fragment)
    _nothing_on_disk(tmp_path)
    sweeps = tmp_path / "runs" / "sweeps"
    assert not sweeps.exists() or not any(sweeps.iterdir()), list(sweeps.iterdir())  # no journal fixed the sweep


# --- a stop during the ONNX export or the data's decompression is a stop: one line, 128+signal, nothing half-made ---
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_during_the_export_is_a_stop_and_the_run_resumes_to_its_end(tmp_path: Path, small_data: Path, sig):
    env = _env(tmp_path, small_data, WANDB_RUN_ID="export01", WANDB_MODE="offline")
    proc = _start(tmp_path, env)
    for line in proc.stdout:
        if line.startswith("test_accuracy "):  # printed just before the export starts
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and f"stopped by {sig.name}" in err, err[-3000:]
    run_dir = tmp_path / "outputs" / "export01"
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "model.onnx").exists()
    (folder,) = runlog.find(tmp_path / "runs")
    assert runlog.read(folder).preempting and runlog.read(folder).exit_code == 128 + sig
    again = run_app(["train"], env, tmp_path)  # the requeued run: test and export only
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "model.onnx").is_file()
    # the resumed run validates nothing again, and its summary still holds what the last epoch measured
    measured = [row["val_accuracy"] for row in runlog.read(folder).history if "val_accuracy" in row]
    (resumed,) = [runlog.read(f) for f in runlog.find(tmp_path / "runs") if f != folder]
    assert resumed.exit_code == 0 and [row for row in resumed.history if "val_accuracy" in row] == []
    assert measured and resumed.summary["val_accuracy"] == measured[-1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_during_decompression_leaves_no_part_file(tmp_path: Path, sig):
    import gzip

    data = tmp_path / "data"
    write_dataset(data, "mnist", n_train=600, n_test=100)
    raw = data / "MNIST" / "raw"
    big = raw / f"{FILES[0]}.gz"  # an archive that takes a while to unpack: 300 MB of zeros
    with gzip.open(big, "wb", compresslevel=1) as f:
        chunk = bytes(1 << 20)
        for _ in range(300):
            f.write(chunk)
    (raw / FILES[0]).unlink()
    proc = _start(tmp_path, _env(tmp_path, data))
    deadline = time.monotonic() + 60
    while not list(raw.glob(".*.part")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert list(raw.glob(".*.part")), "the unpacking was never seen"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and f"stopped by {sig.name}" in err, err[-3000:]
    assert not list(raw.glob(".*.part")) and not (raw / FILES[0]).exists()
    assert sorted(p.name for p in raw.iterdir()) == sorted([f"{FILES[0]}.gz", *FILES[1:]])


# --- every place a run writes is checked before work starts ---
def _chattr(path: Path, flag: str) -> None:
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        message = f"chattr {flag} {path} failed here ({done.stderr.strip()})"
        if __import__("os").environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI runs as root)")
        pytest.skip(message)


def test_a_run_folder_that_is_a_file_is_refused(tmp_path: Path, small_data: Path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "place001").write_text("a file where the run's folder goes")
    proc = run_app(["train"], _env(tmp_path, small_data, WANDB_RUN_ID="place001"), tmp_path)
    _one_refusal(proc, str(tmp_path / "outputs" / "place001"))
    assert not list((tmp_path / "runs").glob("wandb/*run-*")) if (tmp_path / "runs").exists() else True


def test_a_read_only_run_folder_is_refused_before_any_run(tmp_path: Path, small_data: Path):
    folder = tmp_path / "outputs" / "place002"
    folder.mkdir(parents=True)
    _chattr(folder, "+i")
    try:
        proc = run_app(["train"], _env(tmp_path, small_data, WANDB_RUN_ID="place002"), tmp_path)
    finally:
        _chattr(folder, "-i")
    _one_refusal(proc, str(folder))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("wandb/*run-*"))


def test_a_run_folder_made_read_only_during_training_is_one_line(tmp_path: Path, small_data: Path):
    folder = tmp_path / "outputs" / "place003"
    env = _env(tmp_path, small_data, WANDB_RUN_ID="place003", EPOCHS="200", TRAIN_STRIDE="1", VAL_SIZE="100")
    proc = _start(tmp_path, env)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert (folder / "checkpoint.pt").exists(), "no first checkpoint"
        _chattr(folder, "+i")  # the volume turned read-only under the running job
        out, err = proc.communicate(timeout=120)
    finally:
        _chattr(folder, "-i")
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    errors = error_lines(err)
    assert len(errors) == 1 and str(folder / "checkpoint.pt") in errors[0] and "Traceback" not in err, err[-3000:]
    assert _exit_codes(tmp_path / "runs") == [2]  # the W&B run has its exit record


def test_a_checkpoint_that_is_a_fifo_is_refused_not_read(tmp_path: Path, small_data: Path):
    """Reading a FIFO blocks until something writes to it: the resume would hang with no line."""
    (tmp_path / "outputs" / "fifo0001").mkdir(parents=True)
    os.mkfifo(tmp_path / "outputs" / "fifo0001" / "checkpoint.pt")
    proc = run_app(["train"], _env(tmp_path, small_data, WANDB_RUN_ID="fifo0001"), tmp_path, timeout=60)
    _one_refusal(proc, f"checkpoint {tmp_path / 'outputs' / 'fifo0001' / 'checkpoint.pt'} is not a regular file")
    assert not list((tmp_path / "runs").glob("wandb/*run-*")), "a W&B run was opened for a refused resume"


@pytest.mark.parametrize("environ, dotenv", [
    ({"WANDB_MODE": "OFFLINE"}, ""),
    ({"WANDB_MODE": " Offline "}, ""),
    ({}, "WANDB_MODE=' offline'\n"),
], ids=["upper-case", "spaces-and-capital", "dotenv"])
def test_a_wandb_mode_in_other_case_or_with_spaces_trains_offline(tmp_path: Path, small_data: Path, environ, dotenv):
    """Our check reads the mode case-blind; W&B reads WANDB_MODE itself and refused ` Offline` with a
    validation traceback: it must read the mode as we checked it."""
    if dotenv:
        (tmp_path / ".env").write_text(dotenv)
    proc = run_app(["train"], _env(tmp_path, small_data, **environ), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(list((tmp_path / "runs").glob("wandb/offline-run-*"))) == 1


def test_a_reference_in_dotenv_is_expanded_for_the_run_not_taken_as_a_folder_name(tmp_path: Path, small_data: Path):
    """`OUTPUT_DIR=${HOME}/outputs` in .env: compose expands it; the run wrote into a folder named `${HOME}`."""
    home = tmp_path / "home"
    (tmp_path / ".env").write_text("OUTPUT_DIR=${HOME}/outputs\nWANDB_DIR=\"${HOME}/runs\"\n")
    env = _env(tmp_path, small_data, HOME=str(home), WANDB_RUN_ID="home0001")
    del env["OUTPUT_DIR"], env["WANDB_DIR"]  # from the .env
    proc = run_app(["train"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (home / "outputs" / "home0001" / "model.onnx").is_file()
    assert list((home / "runs").glob("wandb/offline-run-*"))
    assert not [p for p in tmp_path.rglob("*") if "$" in p.name], "a folder named after the literal reference"
