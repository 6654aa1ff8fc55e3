"""Trials in one warm process: the same results as a fresh process, complete runs, data kept only while
its files, split and device are the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import REPO, clean_env
from idx import write_dataset

from app import artifact, data, runlog

# train() twice in one process (seed 1, then seed 0), or once (seed 0): each result as one JSON line
TRAIN_IN_ONE_PROCESS = """
import json, os, sys
from app.config import Config
from app.train import train
base = Config(data_dir=sys.argv[1], output_dir=sys.argv[2], epochs=2, val_size=100, train_stride=2, batch_size=64,
              log_interval=3, resume=False)
for seed in map(int, sys.argv[3:]):
    os.environ["WANDB_RUN_ID"] = f"seed{seed}" + ("warm" if len(sys.argv) > 4 else "cold")
    result = train(base.replace(seed=seed), run_settings={"name": f"trial-{seed}", "group": "g", "tags": ["t"]})
    print("RESULT " + json.dumps(result), flush=True)
"""


def train_in_process(tmp: Path, data_dir: Path, seeds: list[int]) -> list[dict]:
    env = clean_env(tmp, WANDB_MODE="offline", WANDB_DIR=str(tmp / "runs"))
    proc = subprocess.run([sys.executable, "-c", TRAIN_IN_ONE_PROCESS, str(data_dir), str(tmp / "outputs"),
                           *map(str, seeds)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def test_a_trial_in_a_warm_process_trains_exactly_as_in_a_fresh_one(tmp_path: Path, small_data: Path):
    warm = train_in_process(tmp_path / "warm", small_data, [1, 0])
    [cold] = train_in_process(tmp_path / "cold", small_data, [0])
    assert len(warm) == 2
    numbers = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "examples_seen", "onnx_max_abs_diff")
    assert {k: warm[1][k] for k in numbers} == {k: cold[k] for k in numbers}
    assert warm[0]["test_loss"] != cold["test_loss"]  # another seed trains otherwise: the comparison can fail

    runs = {}
    for side in ("warm", "cold"):
        for folder in runlog.find(tmp_path / side / "runs"):
            run = runlog.read(folder)
            runs[run.run_id] = (folder, run)
    assert sorted(runs) == ["seed0cold", "seed0warm", "seed1warm"]
    (_, warm_run), (_, cold_run) = runs["seed0warm"], runs["seed0cold"]
    # the same history, step for step (losses and metrics), and the same summary apart from timings
    drop = ("_timestamp", "_runtime", "examples_per_s", "_wandb")
    same = lambda rows: [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]  # noqa: E731
    assert same(warm_run.history) == same(cold_run.history) and len(warm_run.history) > 3
    assert {k: v for k, v in warm_run.summary.items() if not k.startswith(drop)} == \
        {k: v for k, v in cold_run.summary.items() if not k.startswith(drop)}
    assert {**warm_run.config, "output_dir": ""} == {**cold_run.config, "output_dir": ""}  # each side its own folder
    # every run is a whole one: exit 0, ONNX saved and checked, the model artifact with both files
    for run_id, (folder, run) in runs.items():
        assert run.exit_code == 0 and run.summary["onnx_argmax_agreement"] == 1.0, run_id
        assert (folder / "files" / "model.onnx").is_file(), run_id
        [art] = artifact.recorded(folder)
        assert sorted(art.files) == ["checkpoint.pt", "model.onnx"] and art.metadata["run_id"] == run_id, run_id
        names = [rec.run.display_name for rec in runlog.records(next(folder.glob("run-*.wandb")))
                 if rec.WhichOneof("record_type") == "run"]
        assert names and set(names) == {f"trial-{run_id[4]}"}, (run_id, names)


def test_data_is_kept_until_its_files_split_or_device_change(tmp_path: Path):
    write_dataset(tmp_path, n_train=300, n_test=50)
    cpu = torch.device("cpu")
    first = data.load("mnist", str(tmp_path), 20, 2, cpu)
    assert data.load("mnist", str(tmp_path), 20, 2, cpu) is first  # the same files and split: kept
    other_split = data.load("mnist", str(tmp_path), 30, 2, cpu)
    assert other_split is not first and len(other_split.val) == 30
    assert data.load("mnist", str(tmp_path), 20, 2, cpu) is not first  # one entry: the old one was let go

    # the training images rewritten in place (same size): read again, never served stale
    kept = data.load("mnist", str(tmp_path), 20, 2, cpu)
    images = data.raw_folder(tmp_path, "mnist") / "train-images-idx3-ubyte"
    blob = bytearray(images.read_bytes())
    blob[16:16 + 784] = bytes(255 for _ in range(784))  # the first image, all white
    images.write_bytes(bytes(blob))
    st = images.stat()
    os.utime(images, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old modification time
    fresh = data.load("mnist", str(tmp_path), 20, 2, cpu)
    assert fresh is not kept
    assert int(fresh.train.images[0].min()) == 255 and int(kept.train.images[0].min()) != 255

    # a file replaced by another one (a new inode) with the same contents: read again as well
    replacement = images.with_name("new")
    replacement.write_bytes(images.read_bytes())
    os.replace(replacement, images)
    assert data.load("mnist", str(tmp_path), 20, 2, cpu) is not fresh
    if torch.cuda.is_available():
        on_gpu = data.load("mnist", str(tmp_path), 20, 2, torch.device("cuda", 0))
        assert on_gpu.train.images.is_cuda


def test_the_idx_reader_reads_what_torchvision_reads(fashion_dir: Path):
    from torchvision import datasets

    data.ensure("fashion_mnist", fashion_dir)
    for train in (True, False):
        theirs = datasets.FashionMNIST(root=str(fashion_dir), train=train, download=False)
        ours = data._read("fashion_mnist", str(fashion_dir), train)
        assert torch.equal(ours.images[:, 0], theirs.data) and torch.equal(ours.labels, theirs.targets)
        assert ours.images.dtype == torch.uint8 and np.array_equal(ours.labels.unique().numpy(), np.arange(10))
