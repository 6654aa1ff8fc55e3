"""bench/trials.py on two trials each way: every phase of every trial is measured and printed. No timing
assertions: the numbers belong to the machine, not the code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, clean_env

TRIALS = REPO / "bench" / "trials.py"
PHASES = ("start", "checks", "wandb_init", "data", "model", "training", "evaluation", "export", "artifact",
          "finish", "exit")


def run_trials(args: list[str], tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRIALS), *args], env=clean_env(tmp), cwd=tmp, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_every_way_reports_every_phase_of_every_trial(tmp_path: Path, fashion_dir_1k_test: Path):
    out = tmp_path / "trials.json"
    proc = run_trials(["--trials", "2", "--data-dir", str(fashion_dir_1k_test), "--json", str(out),
                       "--work-dir", str(tmp_path / "work")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ways = report["ways"]
    assert list(ways) == ["process", "agent", "warm", "tutorial"]
    for way, s in ways.items():
        assert len(s["trials"]) == 2, way
        # a process per trial ends each one; a warm process ends once, after its last trial, in no trial
        assert (s["process_exit"] is not None and s["process_exit"] > 0) == (way in ("agent", "warm")), way
        for i, trial in enumerate(s["trials"]):
            expected = [p for p in PHASES if way != "tutorial" or p != "artifact"]
            if way in ("agent", "warm"):
                expected.remove("exit")
            assert sorted(trial) == sorted(expected), (way, i, trial)
            assert all(v >= 0 for v in trial.values()), (way, i, trial)
            assert trial["training"] > 0 and trial["evaluation"] > 0 and trial["start"] > 0, (way, i, trial)
        assert s["total"] == pytest.approx([sum(t.values()) for t in s["trials"]])
    # a process per trial pays the imports every time; the warm agent's later trials do not
    for warm in ("agent", "warm"):
        assert ways[warm]["trials"][1]["start"] < ways["process"]["trials"][1]["start"], warm
    assert len(report["import_torch_wandb"]) == 2

    header, *rows = proc.stdout.splitlines()
    for phase in PHASES:
        assert phase in header, phase
    for way in ways:
        assert sum(1 for r in rows if r.split()[:1] == [way]) == 2, way
        assert any(r.startswith(f"{way}: median total") for r in rows), way
    assert "python -c 'import torch, wandb'" in proc.stdout
    # each trial is a whole run: its ONNX export and checkpoint are on disk
    outputs = sorted((tmp_path / "work" / "outputs").glob("*/model.onnx"))
    assert len(outputs) == 6
    assert all(s["gpu_memory_after_runs"] == [] for s in ways.values())  # on the CPU: none held, none said


def test_gpu_memory_held_after_each_warm_run_is_read_from_its_log_and_printed():
    sys.path.insert(0, str(REPO / "bench"))
    import trials

    log = ("[warm-agent] run a ended with exit code 0\n"
           "[warm-agent] GPU memory after the run: 1048576 bytes allocated, 4194304 reserved\n"
           "[warm-agent] GPU memory after the run: 2097152 bytes allocated, 4194304 reserved\n")
    held = trials.gpu_memory(log)
    assert held == [{"allocated": 1 << 20, "reserved": 4 << 20}, {"allocated": 2 << 20, "reserved": 4 << 20}]
    report = {"ways": {"warm": {**trials.summarize([{"training": 1.0}, {"training": 1.0}], 0.1),
                                "gpu_memory_after_runs": held}}, "import_torch_wandb": []}
    assert "warm: GPU memory after each run, MiB allocated/reserved: 1/4, 2/4" in trials.table(report).splitlines()


@pytest.mark.parametrize("args, message", [
    (["--ways", "process,nope"], "--ways 'process,nope': choose from"),
    (["--trials", "0"], "--trials must be >= 1"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str):
    proc = run_trials(args, tmp_path, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not proc.stdout


def test_a_missing_dataset_is_one_error_line(tmp_path: Path):
    proc = run_trials(["--source", str(tmp_path / "none")], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --source {tmp_path / 'none'}: missing train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (apt-get install dataset-fashion-mnist, or point "
        "--source/--data-dir at a copy)"]
