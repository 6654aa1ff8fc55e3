"""bench/ranks.py on tiny settings: one trial on 1 and on 2 gloo ranks runs end to end and reports the
throughput and scaling efficiency docs/performance.md quotes. No timing assertions: the numbers are the
machine's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, clean_env, error_lines
from idx import write_dataset


def test_ranks_bench_reports_one_and_two_ranks(tmp_path: Path):
    write_dataset(tmp_path / "data", "mnist", n_train=600, n_test=100)
    out = tmp_path / "ranks.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ranks.py"), "--device", "cpu", "--ranks", "1,2,3",
                           "--epochs", "2", "--train-stride", "1", "--dataset", "mnist", "--batch-size", "64", "--val-size", "100",
                           "--data-dir", str(tmp_path / "data"), "--json", str(out)],
                          env=clean_env(tmp_path, OMP_NUM_THREADS="1"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    one, two = report["runs"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["scaling_efficiency"] == 1.0
    assert two["examples_per_s"] > 0 and two["speedup"] == round(two["examples_per_s"] / one["examples_per_s"], 3)
    assert len(two["epoch_seconds"]) == 2 and abs(one["test_accuracy"] - two["test_accuracy"]) < 1e-6
    assert report["skipped"] == ["N=3 skipped: it does not divide batch size 64"]
    assert "N=2: " in proc.stdout and "scaling efficiency" in proc.stdout


def test_ranks_bench_bad_ranks_is_one_line_and_exit_2(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ranks.py"), "--ranks", "0,2"], env=clean_env(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [proc.stderr.strip()]
