"""End to end: the unmodified `wandb agent` in 3 `agent` containers (`docker compose up --scale agent=3`)
serves one grid sweep from the stand-in W&B API; every grid point is trained exactly once.

The stand-in hands the first grid point to two agents at once, as W&B does when agents ask together:
one trains it, the other skips it as a duplicate. The agents spread over two fake GPUs (GPU_COUNT=2: slots
and CUDA_VISIBLE_DEVICES without devices; the runs train on the CPU) and every run records the slot it ran
in. Runs are offline, read back from the host's runs folder.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest
from containers import app_image, compose  # noqa: F401  (app_image: the session fixture)
from fake_wandb import FakeWandb
from sweep_project import agent_logs, compose_files, fashion_project, joined, write_env

from app import runlog

pytestmark = [pytest.mark.container, pytest.mark.slow]

GRID = {
    "method": "grid",
    "metric": {"name": "val_accuracy", "goal": "maximize"},
    "parameters": {"learning_rate": {"values": [0.003, 0.01]}, "batch_size": {"values": [64, 128]}},
    "command": ["${env}", "${interpreter}", "-m", "app", "train", "${args}"],
}


def finished_runs(project: Path) -> dict[str, runlog.OfflineRun]:
    runs = {}
    for folder in runlog.find(project / "runs"):
        run = runlog.read(folder)
        runs[run.run_id] = run
    return runs


def test_compose_scale_out_runs_each_grid_point_once(app_image: str, tmp_path: Path):
    project = fashion_project(tmp_path / "project")
    started = time.monotonic()
    with FakeWandb(GRID, duplicates=1) as api:
        # GPU_COUNT=2: two fake devices to spread over; AGENTS_PER_GPU=2 gives each agent half a GPU
        write_env(project, api, GPU_COUNT="2", AGENTS_PER_GPU="2")
        try:
            up = compose("up", "--scale", "agent=3", "agent", project=project, files=compose_files, timeout=900)
            logs = agent_logs(project)
        finally:
            compose("down", "--remove-orphans", project=project, files=compose_files, timeout=120)
    elapsed = time.monotonic() - started
    everything = joined(logs)
    (tmp_path / "agents.log").write_text(everything)  # kept by pytest for a failure's post-mortem
    assert up.returncode == 0, (up.stdout + up.stderr)[-6000:]

    # --- the stand-in's view: 4 grid points handed out, the first one twice ---
    handed = api.assignments
    points = [tuple(sorted(p.items())) for p in (a.params for a in handed)]
    assert len(handed) == 5 and len(set(points)) == 4, handed
    (dup,) = [a for a in handed if a.duplicate_of]
    assert len({a.agent_id for a in handed}) == 3  # all three agents registered and worked

    # --- the runs on disk: every grid point trained exactly once, with its sweep values ---
    runs = finished_runs(project)
    trained = {rid: r for rid, r in runs.items() if r.exit_code == 0 and "test_accuracy" in r.summary}
    by_point = Counter((r.config["learning_rate"], r.config["batch_size"]) for r in trained.values())
    grid = {(lr, bs) for lr in (0.003, 0.01) for bs in (64, 128)}
    assert set(by_point) == grid and set(by_point.values()) == {1}, (by_point, everything[-6000:])
    for a in handed:
        if a.run_id in trained:
            run = trained[a.run_id]
            assert {k: run.config[k] for k in a.params} == a.params  # the sweep's values reached the run's config
            assert run.sweep_id == api.sweep_id
            assert 0.3 < run.summary["test_accuracy"] <= 1.0  # real Fashion-MNIST, one short epoch
            assert run.config["gpu_memory_fraction"] == 0.5  # the agent's memory share, as the config key

    # --- the duplicate: one of its two runs trained, the other recorded as a `duplicate` run that trained nothing ---
    pair = {dup.run_id, dup.duplicate_of}
    assert len(pair & set(trained)) == 1
    (skipped,) = pair - set(trained)
    (kept,) = pair & set(trained)
    assert runs[skipped].summary.get("duplicate_of") == kept, runs[skipped].summary
    assert "test_accuracy" not in runs[skipped].summary and "loss" not in runs[skipped].summary
    skips = re.findall(r"skipping duplicate sweep run (\w+)", everything)
    assert skips == [skipped], everything[-6000:]

    # --- GPU slots: 3 agents over 2 fake GPUs, and each run trained in its agent's slot ---
    slots = {}
    for container, lines in logs.items():
        (slot_line,) = [t for t in lines if t.startswith("gpu slot:")]
        slots[container] = re.search(r"CUDA_VISIBLE_DEVICES=(\d+)", slot_line)[1]
    assert sorted(Counter(slots.values()).values()) == [1, 2], slots
    for container, lines in logs.items():
        for rid in re.findall(r"^done: run (\w+)", "\n".join(lines), flags=re.M):
            assert trained[rid].summary["cuda_visible_devices"] == slots[container], (rid, container)
    done = re.findall(r"^\S+ \| done: run (\w+)", everything, flags=re.M)
    assert sorted(done) == sorted(trained)  # every trained run is accounted to one agent's log

    print(f"\ne2e: {len(handed)} hand-outs, {len(trained)} runs trained, {len(skips)} duplicate(s) detected and "
          f"skipped, agents per fake GPU {dict(Counter(slots.values()))}, {elapsed:.0f}s")
