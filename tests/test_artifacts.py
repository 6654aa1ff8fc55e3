"""The model artifact: logged offline (in a removed container, in offline sweep trials), uploaded later by
the host's `python -m app sync` through the unmodified `wandb sync` to the W&B stand-in, and shown in the
report as a real headless Chromium renders it.

What the stand-in receives is what W&B would store: the artifact's files byte for byte, its metadata
and aliases, one version per trial. The container is gone before the sync starts, so every file the
upload reads must have lived on the runs volume.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env, run_app
from containers import app_image, compose  # noqa: F401,F811  (session fixture)
from fake_wandb import FakeWandb
from sweep_project import fashion_project

from app import artifact, runlog
from app.runs import report, sweepcharts

TINY = {"DATASET": "fashion_mnist", "EPOCHS": "1", "TRAIN_STRIDE": "50", "VAL_SIZE": "1000", "WATCH_LOG": "none"}
SWEEP = """name: tiny-artifacts
method: grid
metric: {name: val_accuracy, goal: maximize}
parameters:
  learning_rate: {values: [0.0003, 0.003, 0.03]}
"""


def sync(runs: Path, api: FakeWandb, tmp: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = clean_env(tmp, WANDB_BASE_URL=api.url, WANDB_API_KEY="k" * 40)
    t0 = time.monotonic()
    proc = run_app(["sync", str(runs)], env, tmp, timeout=300)
    return proc, time.monotonic() - t0


def recorded_artifacts(folder: Path) -> list:
    log = next(folder.glob("run-*.wandb"))
    return [r.artifact for r in runlog.records(log) if r.WhichOneof("record_type") == "artifact"]


@pytest.mark.container
def test_an_offline_run_in_a_removed_container_uploads_its_model_from_the_host(app_image, tmp_path: Path):
    project = fashion_project(tmp_path / "project")
    (project / ".env").write_text("".join(f"{k}={v}\n" for k, v in {**TINY, "WANDB_MODE": "offline"}.items()))
    proc = compose("run", "--rm", "train", project=project, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    (folder,) = runlog.find(project / "runs")
    run = runlog.read(folder)
    onnx = (project / "outputs" / run.run_id / "model.onnx").read_bytes()
    ckpt = (project / "outputs" / run.run_id / "checkpoint.pt").read_bytes()
    (record,) = recorded_artifacts(folder)
    # recorded relative to the folder holding the run folder, so the host finds them under its own path;
    # all inside the run folder: nothing in W&B's staging folder (the container's home, gone by now)
    for entry in record.manifest.contents:
        assert not os.path.isabs(entry.local_path), entry.local_path
        path = folder.parent / entry.local_path
        assert path.is_file() and path.parent == folder / artifact.FOLDER

    with FakeWandb() as api:
        first, seconds = sync(project / "runs", api, tmp_path)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        (model,) = api.versions("fashion-mnist-convnet")
        assert model.type == "model" and model.run_id == run.run_id and model.qualified == "fashion-mnist-convnet:v0"
        assert model.files["model.onnx"] == onnx and model.files["checkpoint.pt"] == ckpt
        assert set(model.manifest["contents"]) == {"model.onnx", "checkpoint.pt"}
        assert "latest" in model.aliases
        meta = model.metadata
        assert meta["test_accuracy"] == run.summary["test_accuracy"] and meta["test_loss"] == run.summary["test_loss"]
        assert meta["onnx_argmax_agreement"] == 1.0 and meta["onnx_checked_images"] == 256
        assert meta["config"]["dataset"] == "fashion_mnist" and meta["config"] == run.config
        assert meta["torch"] and meta["onnx"] and meta["onnxruntime"] and meta["run_id"] == run.run_id
        assert api.run_files[(run.run_id, "model.onnx")] == onnx  # run.save as the tutorial has it, too
        print(f"sync of one run with its {len(onnx) + len(ckpt)}-byte artifact: {seconds:.2f} s")

        puts, creates = api.puts, api.operations.count("CreateArtifact")
        again, _ = sync(project / "runs", api, tmp_path)
        assert again.returncode == 0 and "1 already synced" in again.stdout and "0 to upload" in again.stdout
        assert api.puts == puts and api.operations.count("CreateArtifact") == creates


def test_an_online_run_uploads_its_model_as_it_finishes(small_data, tmp_path: Path):
    with FakeWandb() as api:
        env = clean_env(tmp_path, WANDB_BASE_URL=api.url, WANDB_API_KEY="k" * 40, WANDB_MODE="online",
                        DATA_DIR=str(small_data), EPOCHS="1", VAL_SIZE="200", WATCH_LOG="none",
                        WANDB_DIR=str(tmp_path / "runs"), OUTPUT_DIR=str(tmp_path / "outputs"))
        proc = run_app(["train"], env, tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (model,) = api.versions("mnist-convnet")
        outputs = tmp_path / "outputs" / model.run_id
        assert model.files == {"model.onnx": (outputs / "model.onnx").read_bytes(),
                               "checkpoint.pt": (outputs / "checkpoint.pt").read_bytes()}
        assert model.metadata["dataset"] == "mnist" and model.metadata["config"]["epochs"] == 1
        assert "latest" in model.aliases and "sweep" not in model.metadata  # a single run: no sweep alias
    # W&B's staging folder for the upload: on the runs folder, as in a container, not in ~/.local/share
    assert (tmp_path / "runs" / artifact.DATA_DIR / "artifacts" / "staging").is_dir()


ONE_POINT = {"method": "grid", "parameters": {"learning_rate": {"values": [0.003]}},
             "command": ["${env}", "${interpreter}", "-m", "app", "train", "${args}"]}


def test_a_wandb_agent_trial_logs_its_model_with_the_sweep(small_data, tmp_path: Path):
    """The unmodified `wandb agent` starts the trial; the run goes online to the stand-in."""
    with FakeWandb(ONE_POINT) as api:
        env = clean_env(tmp_path, WANDB_BASE_URL=api.url, WANDB_API_KEY="k" * 40, DATA_DIR=str(small_data),
                        EPOCHS="1", VAL_SIZE="200", WATCH_LOG="none", WANDB_DIR=str(tmp_path / "runs"),
                        OUTPUT_DIR=str(tmp_path / "outputs"))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # ${interpreter} is `python`
        wandb_cli = Path(sys.executable).with_name("wandb")
        proc = subprocess.run([str(wandb_cli), "agent", api.sweep_path], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (assignment,) = api.assignments
        models = api.versions("mnist-convnet")
        assert len(models) == 1, proc.stderr[-3000:]
        (model,) = models
        assert model.run_id == assignment.run_id
        assert model.metadata["wandb_sweep"] == api.sweep_id and model.metadata["config"]["learning_rate"] == 0.003
        # the sweep's best is the W&B server's to know: no best alias from a trial
        assert model.requested_aliases == ["latest"] and "sweep" not in model.metadata
        assert model.files["model.onnx"] == (tmp_path / "outputs" / model.run_id / "model.onnx").read_bytes()


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory, fashion_dir_1k_test) -> Path:
    """An offline sweep of three trials (one agent, real Fashion-MNIST, one epoch each)."""
    tmp = tmp_path_factory.mktemp("artifact-sweep")
    (tmp / "sweep.yaml").write_text(SWEEP)
    env = clean_env(tmp, **TINY, DATA_DIR=str(fashion_dir_1k_test), LOG_INTERVAL="3", DEVICE="cpu", WANDB_MODE="offline",
                    WANDB_DIR=str(tmp / "runs"), OUTPUT_DIR=str(tmp / "outputs"), SWEEP_CONFIG=str(tmp / "sweep.yaml"))
    proc = run_app(["offline-agent"], env, tmp, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "runs"


def test_an_offline_sweep_makes_one_version_per_trial(sweep_runs, tmp_path: Path):
    # start order: folder names only tell it to the second, and tiny trials start within one
    runs = sorted(map(runlog.read, runlog.find(sweep_runs)), key=sweepcharts.started)
    assert len(runs) == 3
    # the best-so-far alias, decided offline from the sweep's journal: the first trial has nothing to
    # beat, later ones claim it only by beating every trial completed before them
    claims = {r.run_id: list(recorded_artifacts(r.path)[0].aliases) for r in runs}
    seen: list[float] = []
    for r in runs:
        value = r.summary["val_accuracy"]
        assert ("best-tiny-artifacts" in claims[r.run_id]) == all(value > v for v in seen), (claims, value, seen)
        seen.append(value)
    best = max(runs, key=lambda r: r.summary["val_accuracy"])
    assert "best-tiny-artifacts" in claims[best.run_id]

    with FakeWandb() as api:
        proc, seconds = sync(sweep_runs, api, tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:]
        versions = api.versions("fashion-mnist-convnet")
        assert [v.version for v in versions] == [0, 1, 2]
        by_run = {v.run_id: v for v in versions}
        assert set(by_run) == {r.run_id for r in runs}
        for r in runs:
            v = by_run[r.run_id]
            onnx = sweep_runs.parent / "outputs" / r.run_id / "model.onnx"
            assert v.files["model.onnx"] == onnx.read_bytes()
            assert v.metadata["config"]["learning_rate"] == r.config["learning_rate"]
            assert v.metadata["sweep"] == {"name": "tiny-artifacts", "metric": "val_accuracy", "goal": "maximize",
                                           "value": r.summary["val_accuracy"]}
            assert v.requested_aliases == claims[r.run_id]
        assert {v.metadata["config"]["learning_rate"] for v in versions} == {0.0003, 0.003, 0.03}
        # uploaded in parallel, yet the alias ends on the best trial's version (claims go last, worst first)
        assert [v.run_id for v in versions if "best-tiny-artifacts" in v.aliases] == [best.run_id]
        print(f"sync of 3 trial runs with their artifacts: {seconds:.2f} s")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "no Chromium: apt-get install chromium (bash .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI must run the browser test)")
        pytest.skip(message)
    return found


def browse(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local file, with nothing that reaches for the network."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--disable-quic", f"--user-data-dir={tmp}"]
    return subprocess.run([chromium(), *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120)


def test_the_report_renders_its_tables_and_charts_in_a_real_browser(sweep_runs, tmp_path: Path):
    from PIL import Image, ImageStat

    out = tmp_path / "report"
    index, problems = report.render(sweep_runs, out)
    assert problems == []
    dom = browse(index, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # what the browser built from the page: the run table with its artifact column, and the inline charts
    assert html.count("<table") == 1 and re.search(r"<th[^>]*>model artifact</th>", html) and re.search(r"<th[^>]*>epochs done</th>", html)
    assert html.count('<th title="sort by this column">') == html.count("</th>") > 5  # the table's sorter ran
    assert html.count("fashion-mnist-convnet:latest") == 4  # a table row per run, and the best run's summary
    # what the sweep found (parallel coordinates, importance, history), then the scatter and the curves
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg"') == 5
    assert html.count('class="line"') >= 6 and 'class="best"' in html  # 3 runs x 2 curves at least; the ring

    shot = tmp_path / "report.png"
    proc = browse(index, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,2000",
                  "--hide-scrollbars")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 2000)
    stat = ImageStat.Stat(image)
    assert stat.stddev[0] > 10, f"the screenshot is blank-ish: stddev {stat.stddev[0]:.1f}"
    # ink in the upper part (title, table) and lower down (the charts), not one lone element
    top, lower = image.crop((0, 0, 1400, 400)), image.crop((0, 400, 1400, 1400))
    assert min(ImageStat.Stat(top).stddev[0], ImageStat.Stat(lower).stddev[0]) > 5
