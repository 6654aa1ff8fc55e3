"""`python -m app report`: charts and a static page from offline runs, with no server.

A real offline sweep (2 grid points, one agent, Fashion-MNIST) makes the runs and the journal;
the report must show both runs, sorted by the sweep's own metric, with charts that have content.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import clean_env, error_lines, run_app

pytestmark = pytest.mark.slow

SWEEP = """name: tiny-report
method: grid
metric: {name: val_loss, goal: minimize}
parameters:
  learning_rate: {values: [0.0005, 0.02]}
"""


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory, fashion_dir) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "sweep.yaml").write_text(SWEEP)
    env = clean_env(tmp, DATASET="fashion_mnist", DATA_DIR=str(fashion_dir), EPOCHS="3", TRAIN_STRIDE="50",
                    VAL_SIZE="1000", LOG_INTERVAL="3", BATCH_SIZE="64", WATCH_LOG="none", WANDB_MODE="offline", WANDB_DIR=str(tmp / "runs"),
                    OUTPUT_DIR=str(tmp / "outputs"), SWEEP_CONFIG=str(tmp / "sweep.yaml"))
    proc = run_app(["offline-agent"], env, tmp, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "runs"


def looks_like_a_chart(path: Path, min_width: int) -> None:
    from matplotlib import image

    pixels = image.imread(path)
    assert pixels.shape[1] >= min_width and pixels.shape[0] >= 300
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # lines, markers, text: not a blank canvas


def test_report_renders_the_sweep(sweep_runs, tmp_path):
    out = tmp_path / "report"
    proc = run_app(["report", str(sweep_runs), "--out", str(out)], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = (out / "index.html").read_text()
    assert '<img src="tiny-report-curves.png"' in page and '<img src="tiny-report-params.png"' in page
    looks_like_a_chart(out / "tiny-report-curves.png", 1200)
    looks_like_a_chart(out / "tiny-report-params.png", 400)
    # the table: both trials, the sweep's metric (val_loss, minimize) from its journal, best first
    assert "<th>learning_rate</th><th>val_loss</th>" in page and "goal: minimize val_loss" in page
    rows = re.findall(r"<tr><td>(\w{8})</td><td>finished</td><td>([\d.]+)</td><td>([\d.]+)</td>", page)
    assert len(rows) == 2, page
    assert float(rows[0][2]) <= float(rows[1][2])
    assert {r[1] for r in rows} == {"0.0005", "0.02"}


def test_report_without_runs_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_app(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1 and "no offline runs" in proc.stderr
