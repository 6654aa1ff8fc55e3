"""bench/bench.py on tiny settings: it runs end to end as documented and reports every number the
docs/performance.md's table needs. No timing assertions: the numbers belong to the machine, not the code."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, clean_env, error_lines

BENCH = REPO / "bench" / "bench.py"


def run_bench(args: list[str], tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], env=clean_env(tmp), cwd=tmp, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_benchmark_reports_every_pipeline_ratio_and_gpu_section_field(tmp_path: Path, fashion_dir_1k_test: Path):
    out = tmp_path / "bench.json"
    proc = run_bench(["--device", "cpu", "--repeats", "1", "--epochs", "2", "--train-stride", "100",
                      "--full-epoch", "--full-stride", "100",
                      "--agents", "2", "--agent-epochs", "2", "--data-dir", str(fashion_dir_1k_test), "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["settings"]["train_examples"] == 600 and report["settings"]["device"] == "cpu"
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["gpu"] is None
    pipelines = report["pipelines"]
    assert list(pipelines) == ["tutorial", "ours", "ours-disabled"]
    for name, p in pipelines.items():
        assert p["examples_per_s"]["min"] <= p["examples_per_s"]["median"] <= p["examples_per_s"]["max"], name
        assert p["examples_per_s"]["median"] > 0, name
        assert [len(epochs) for epochs in p["epoch_seconds"]] == [2], name  # warm-up epoch recorded, not counted
        assert 0.2 < p["test_accuracy"]["median"] <= 1.0, name  # 10 classes: chance is 0.1
    # W&B's mode changes what is recorded, never what is trained
    assert pipelines["ours"]["test_accuracy"]["values"] == pipelines["ours-disabled"]["test_accuracy"]["values"]

    ratios = report["ratios"]
    for key in ("speedup ours", "accuracy delta ours", "wandb_overhead"):
        assert set(ratios[key]) == {"median", "min", "max", "values"}, key
    speed = pipelines["ours"]["examples_per_s"]["median"] / pipelines["tutorial"]["examples_per_s"]["median"]
    assert ratios["speedup ours"]["median"] == pytest.approx(speed)
    assert {k: type(v["met"]) for k, v in report["targets"].items()} == {"speedup": bool, "accuracy": bool, "wandb_overhead": bool}

    full = report["full_epoch"]
    assert full["train_stride"] == 100 and full["epoch_seconds"]["median"] > 0 and full["examples_per_s"]["median"] > 0
    agents = report["agents"]
    assert agents["agents"] == 2 and len(agents["per_agent"]) == 2
    assert agents["aggregate_examples_per_s"] > 0 and 0.0 <= agents["overlap"] <= 1.0
    assert all(a["max_memory_allocated"] is None for a in agents["per_agent"])  # CUDA-only number

    table = proc.stdout
    for text in ("tutorial", "ours-disabled", "W&B overhead", "full 60000-image epoch", "2 agents on one device", "target speedup"):
        assert text in table, text


@pytest.mark.parametrize("args, message", [
    (["--source", "/nonexistent"], "--source /nonexistent: missing train-images-idx3-ubyte.gz"),
    (["--variant", "nope=1"], "--variant nope=1: unknown config key 'nope'"),
    (["--variant", "amp=fp8"], "amp='fp8' must be one of: none, bf16"),
    (["--pipelines", "tutorial,fast"], "--pipelines 'tutorial,fast': choose from"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str):
    proc = run_bench(args, tmp_path, timeout=120)
    assert proc.returncode == 2
    assert len(error_lines(proc.stderr)) == 1 and message in proc.stderr, proc.stderr
    assert not proc.stdout


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_module", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_ratios_are_paired_within_a_repeat_and_overhead_is_extra_training_time():
    bench = load_bench()
    P = bench.Pipeline
    pipelines = [P("tutorial", "tutorial", "offline"), P("ours", "ours", "offline"), P("ours-disabled", "ours", "disabled")]
    rate = {("tutorial", 0): 100.0, ("ours", 0): 200.0, ("ours-disabled", 0): 210.0,
            ("tutorial", 1): 50.0, ("ours", 1): 150.0, ("ours-disabled", 1): 150.0}
    epochs = [bench.Epoch(2.0, 100, 0.0, 2.0, 0.0, 3.0), bench.Epoch(1.0, 100, 2.0, 3.0, 0.0, 2.0)]  # warm-up, then one
    runs = [bench.Run(name, r, value, 0.8 if name == "tutorial" else 0.81, epochs, 3.0, 0.0) for (name, r), value in rate.items()]
    summary = bench.summarize(runs, pipelines, repeats=2)
    # per repeat: 200/100 = 2.0 and 150/50 = 3.0, not the ratio of medians (175/75)
    assert summary["ratios"]["speedup ours"]["values"] == [2.0, 3.0]
    # offline took 210/200 - 1 = 5% longer than disabled in repeat 0, the same time in repeat 1
    assert summary["ratios"]["wandb_overhead"]["values"] == pytest.approx([0.05, 0.0])
    assert summary["ratios"]["accuracy delta ours"]["median"] == pytest.approx(0.01)
    assert summary["pipelines"]["ours"]["examples_per_s"] == {"median": 175.0, "min": 150.0, "max": 200.0, "values": [200.0, 150.0]}
    assert summary["pipelines"]["ours"]["cpu_s_per_1k_examples"]["median"] == 20.0  # warm-up epoch's 3 s left out


@pytest.mark.parametrize("deltas, met", [
    ([-0.0085, -0.0076, 0.0020, -0.0029, -0.0025, 0.0067, 0.0027, 0.0104], True),  # measured: seed noise both ways
    ([-0.010, -0.011, -0.009], False),  # worse on every seed, by more than the seeds spread
    ([0.001], True),
    ([-0.001], False),  # one seed: no spread to judge by, so strictly
])
def test_accuracy_target_allows_seed_noise_but_not_a_consistent_loss(deltas: list[float], met: bool):
    bench = load_bench()
    report = {"ratios": {"speedup ours": {"median": 2.0}, "accuracy delta ours": {"values": deltas}}}
    assert bench.verdicts(report, bench.torch.device("cpu"))["accuracy"]["met"] is met


@pytest.mark.slow
def test_wandb_parts_pairs_every_window_and_prices_a_log_call(tmp_path: Path, fashion_dir: Path):
    out = tmp_path / "parts.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "wandb_parts.py"), "--data-dir", str(fashion_dir),
                           "--windows", "2", "--steps", "3", "--json", str(out)],
                          env=clean_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["steps_per_window"] == 3
    for part in ("run_open", "watch_hooks"):
        assert len(report[part]["values"]) == 2  # one paired ratio per window
        assert all(-1 < v < 10 for v in report[part]["values"])
    assert report["run_log_us"] > 0 and report["step_ms"]["median"] > 0
    # the share is the call's time over log_interval steps of the measured step time
    expected = report["run_log_us"] / 1e3 / (report["settings"]["log_interval"] * report["step_ms"]["median"])
    assert abs(report["run_log_share"] - expected) < 1e-9 * max(1.0, expected)
    assert "one run.log call" in proc.stdout and not list(tmp_path.glob("wandb"))


def test_wandb_parts_missing_dataset_is_one_line_and_exit_2(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "wandb_parts.py"), "--source", "/nonexistent"],
                          env=clean_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [line for line in proc.stderr.splitlines() if line.strip()]
    assert "--source /nonexistent: missing" in proc.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_writes_its_json(tmp_path: Path):
    """The GPU script's own path on the CPU: every step starts, finishes and leaves its numbers, so the few
    minutes a GPU is lent go to measuring."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu-check"), "--dry-run", "--out", str(out)],
                          env=clean_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=1500)
    report = json.loads((out / "gpu-check.json").read_text())
    failed = {k: v.get("log_tail") for k, v in report["steps"].items() if not v["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-2000:], proc.stderr[-2000:])
    steps = report["steps"]
    assert list(steps) == ["env", "tests", "bench", "full_epoch", "profile", "trials", "ranks", "agents"]
    assert steps["env"]["results"]["torch"] and steps["env"]["results"]["cpus"] >= 1
    assert any("skipped" in line for line in steps["tests"]["log_tail"])  # CUDA-only tests: skipped on the CPU
    bench = steps["bench"]["results"]
    assert set(bench["pipelines"]) == {"tutorial", "ours", "ours-disabled"}
    assert len(bench["ratios"]["accuracy delta ours"]["values"]) == 2 and "wandb_overhead" in bench["ratios"]
    assert steps["full_epoch"]["results"]["full_epoch"]["epoch_seconds"]["median"] > 0
    profile = steps["profile"]["results"]
    assert profile["ms_per_step"]["whole"] > 0 and profile["top"] and profile["step_kind"] == "EagerStep"
    trials = steps["trials"]["results"]["ways"]["agent"]  # the offline agent's trials, phase by phase
    assert len(trials["trials"]) == 2 and all(t["training"] > 0 and t["export"] > 0 for t in trials["trials"]), trials
    assert all(total > compute > 0 for total, compute in zip(trials["total"], trials["compute"])), trials
    ranks = steps["ranks"]["results"]["runs"]  # one trial on 1 and on 2 (gloo) ranks
    assert [r["ranks"] for r in ranks] == [1, 2] and ranks[1]["scaling_efficiency"] > 0, ranks
    one, four = steps["agents"]["results"]
    assert (one["agents"], four["agents"]) == (1, 4)
    for agents in (one, four):  # every grid point trained to the end, by agents started through the entrypoint
        assert agents["all_trials_complete"] and agents["finished_runs"] == agents["grid_points"] > 0, agents
        assert agents["trials_per_hour"] > 0 and len(agents["peak_gpu_mib_per_agent"]) == agents["agents"]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "full_epoch.json", "gpu-check.json", "logs", "profile.json",
                                                     "ranks.json", "trials.json"]


def test_gpu_check_unknown_step_is_one_line_and_exit_2(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu-check"), "--steps", "env,warp", "--out",
                           str(tmp_path / "out")], env=clean_env(tmp_path), cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [proc.stderr.strip()]
    assert "--steps: unknown warp" in proc.stderr
