"""Training: the tutorial's config on real Fashion-MNIST (read back from the offline run), ONNX against
torch, stop-and-resume on SIGTERM, and the pieces train() is built from."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import clean_env, error_lines, run_app
from idx import write_dataset
import procs

from app import artifact, data, interrupts, runlog
from app.errors import UserError
from app.export import ExportError, export_onnx, verify
from app.model import ConvNet, Normalized
from app.interrupts import StopRequest
from app.train import Preempted, pick_device, save_checkpoint

TUTORIAL = {"epochs": 1, "classes": 10, "kernels": [16, 32], "batch_size": 128, "learning_rate": 0.005,
            "dataset": "fashion_mnist", "architecture": "CNN", "train_stride": 5}


@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory, fashion_dir: Path):
    """One epoch of the tutorial's config (defaults + EPOCHS=1) on the real Fashion-MNIST, offline."""
    cwd = tmp_path_factory.mktemp("tutorial")
    env = clean_env(cwd, DATASET="fashion_mnist", DATA_DIR=str(fashion_dir), EPOCHS="1", WANDB_MODE="offline",
                    WANDB_DIR=str(cwd / "runs"), OUTPUT_DIR=str(cwd / "outputs"),
                    PYTHONPROFILEIMPORTTIME="1")  # every module the process imports, on stderr
    proc = run_app(["train"], env, cwd, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cwd / "stderr.txt").write_text(proc.stderr)
    [folder] = runlog.find(cwd / "runs")
    run = runlog.read(folder)
    return cwd, folder, run


@pytest.mark.slow
def test_tutorial_run_records_config_history_and_accuracy(tutorial_run):
    _, _, run = tutorial_run
    assert run.exit_code == 0 and not run.preempting
    assert {k: run.config[k] for k in TUTORIAL} == TUTORIAL
    assert run.config["seed"] == 0
    # loss every 25 batches of 128 at step = examples seen: the tutorial's 12000 images -> 3200, 6400, 9600
    loss = run.metric("loss")
    assert [step for step, _ in loss] == [3200, 6400, 9600]
    assert all(np.isfinite(v) for _, v in loss) and loss[-1][1] < loss[0][1]
    assert {row["epoch"] for row in run.history if "loss" in row} == {0}
    [(val_step, val_acc)] = run.metric("val_accuracy")
    assert val_step == 12_000 and 0.5 < val_acc <= 1.0
    assert run.metric("val_loss") and run.metric("examples_per_s")[0][1] > 0
    assert run.summary["test_accuracy"] >= 0.80, f"test_accuracy {run.summary['test_accuracy']:.4f}"
    assert run.metric("test_accuracy")[0][1] == run.summary["test_accuracy"]


@pytest.mark.slow
def test_a_run_process_imports_neither_torch_dynamo_nor_wandb_launch(tutorial_run):
    """What a process per run need not pay (~1.3 s of a minimal trial on the CPU): torch._dynamo, which
    torch.optim imports on first use, and W&B's launch and public-API packages, which wandb.init imports
    to look for Launch inputs."""
    cwd, _, _ = tutorial_run
    log = (cwd / "stderr.txt").read_text().splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in log if line.startswith("import time:")}
    assert {"torch", "torch.optim", "wandb", "onnxruntime"} <= imported  # the log covers the whole run
    assert not {m for m in imported if m.startswith(("torch._dynamo", "wandb.sdk.launch", "wandb.apis.public"))}


@pytest.mark.slow
def test_tutorial_run_onnx_is_a_real_copy_that_agrees_with_torch(tutorial_run, fashion_dir: Path):
    cwd, folder, run = tutorial_run
    saved = folder / "files" / "model.onnx"
    output = cwd / "outputs" / run.run_id / "model.onnx"
    assert saved.is_file() and not saved.is_symlink()  # survives moving the runs folder to another host
    assert output.is_file() and saved.read_bytes() == output.read_bytes()
    assert run.summary["onnx_max_abs_diff"] < 1e-4 and run.summary["onnx_argmax_agreement"] == 1.0

    ckpt = torch.load(cwd / "outputs" / run.run_id / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["run_id"] == run.run_id and ckpt["config"]["kernels"] == [16, 32]
    assert {"model", "optimizer", "epoch", "config"} <= set(ckpt)
    model = ConvNet(ckpt["config"]["kernels"], ckpt["config"]["classes"])
    model.load_state_dict(ckpt["model"])
    _, mean, std = data.DATASETS["fashion_mnist"]
    net = Normalized(model, mean, std).eval()

    test = data.load("fashion_mnist", str(fashion_dir), val_size=5000, train_stride=5, device=torch.device("cpu")).test
    images = test.images[:1000].float().div(255)  # what the ONNX model takes: [N, 1, 28, 28] in [0, 1]
    session = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        want = net(images).numpy()
    assert got.shape == (1000, 10)
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    # the checkpoint is the model that was tested: its accuracy on these images matches the run's
    accuracy = float((want.argmax(1) == test.labels[:1000].numpy()).mean())
    assert abs(accuracy - run.summary["test_accuracy"]) < 0.05


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_same_run_id_resumes(tmp_path: Path):
    """Preemption: SIGTERM mid-epoch -> checkpoint, run marked preempting, exit 143; the requeued run
    (same WANDB_RUN_ID, as `wandb agent` requeues it) continues from the checkpoint and completes."""
    data_dir = tmp_path / "data"
    write_dataset(data_dir, "mnist", n_train=2200, n_test=200)
    run_id = "resume01"
    env = clean_env(tmp_path, DATA_DIR=str(data_dir), EPOCHS="2", TRAIN_STRIDE="1", VAL_SIZE="200",
                    LOG_INTERVAL="5", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "runs"),
                    OUTPUT_DIR=str(tmp_path / "outputs"), WANDB_RUN_ID=run_id)
    ckpt_path = tmp_path / "outputs" / run_id / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "app", "train"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        procs.wait_for(ckpt_path, proc)  # written at the end of epoch 1: stop it inside epoch 2
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM: checkpoint written, run marked preempting" in err
    stopped = torch.load(ckpt_path, weights_only=False)
    assert stopped["epoch"] == 1  # epoch 2 is redone on resume, from the weights so far
    assert 2000 < stopped["examples_seen"] < 4000
    assert not (tmp_path / "outputs" / run_id / "model.onnx").exists()
    [first] = runlog.find(tmp_path / "runs")
    killed = runlog.read(first)
    assert killed.preempting and killed.exit_code == 143 and killed.run_id == run_id
    assert not list(ckpt_path.parent.glob("*.tmp"))

    proc2 = run_app(["train"], env, tmp_path, timeout=300)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert f"resuming run {run_id} from {ckpt_path}: 1 epoch(s) done, {stopped['examples_seen']} examples seen" in proc2.stdout
    done = torch.load(ckpt_path, weights_only=False)
    # the resumed run goes on from where the stop left epoch 2: two epochs' examples in all, no more
    assert done["epoch"] == 2 and done["examples_seen"] == 4000
    assert (tmp_path / "outputs" / run_id / "model.onnx").is_file()
    [second] = [f for f in runlog.find(tmp_path / "runs") if f != first]
    resumed = runlog.read(second)
    assert resumed.run_id == run_id and resumed.exit_code == 0 and not resumed.preempting
    steps = [step for step, _ in resumed.metric("loss")]
    assert steps and min(steps) > stopped["examples_seen"]  # W&B steps keep increasing across the restart
    assert {row["epoch"] for row in resumed.history if "loss" in row} == {1}
    assert resumed.summary["test_accuracy"] > 0.5


# --- a diverged run: a result, not a failure ---

# on tests/idx.py's synthetic images a learning rate up to 1e8 keeps the loss finite (huge, then 0: the
# classes are easy); 1e12 makes the second step's loss NaN, as 10 or 1e3 do on harder data
DIVERGING_LR = "1e12"


def small_run_env(tmp_path: Path, data_dir: Path, run_id: str, **extra: str) -> dict[str, str]:
    return clean_env(tmp_path, DATA_DIR=str(data_dir), DATASET="mnist", VAL_SIZE="200", TRAIN_STRIDE="1",
                     BATCH_SIZE="32", LOG_INTERVAL="2", EPOCHS="2", DEVICE="cpu", WATCH_LOG="none",
                     WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "runs"), OUTPUT_DIR=str(tmp_path / "outputs"),
                     WANDB_RUN_ID=run_id, **extra)


def test_a_diverging_run_stops_at_its_first_non_finite_loss_as_a_finished_run(tmp_path: Path, small_data: Path):
    """learning_rate far too high: the run ends at the first log point whose loss is NaN/inf, well inside
    its first epoch, with exit code 0 (a finished trial for `wandb agent`), summary diverged and where; no
    test, no ONNX (nor its .tmp), no checkpoint of the NaN weights, no model artifact."""
    env = small_run_env(tmp_path, small_data, "diverge1")
    proc = run_app(["train", f"--learning_rate={DIVERGING_LR}"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = re.search(r"^done: run diverge1 diverged: loss (nan|inf) at step (\d+) \(epoch 1\); stopped there "
                     r"\(no test or export\)$", proc.stdout, re.M)
    assert said, proc.stdout[-2000:]
    step = int(said.group(2))
    assert step < 1000  # the epoch's 1000 training images: it stopped well inside the first epoch

    [folder] = runlog.find(tmp_path / "runs")
    run = runlog.read(folder)
    assert run.exit_code == 0 and not run.preempting
    assert run.summary["diverged"] is True and run.summary["diverged_step"] == step
    assert run.summary["diverged_epoch"] == 0 and run.summary["diverged_at"] == f"loss {said.group(1)} at step {step} (epoch 1)"
    losses = run.metric("loss")
    # logged up to the first non-finite reading, and not one log point further
    assert losses[-1][0] == step and not math.isfinite(losses[-1][1])
    assert all(math.isfinite(v) for _, v in losses[:-1]) and all(s < step for s, _ in losses[:-1])
    assert not run.metric("val_loss") and "test_accuracy" not in run.summary and "onnx_max_abs_diff" not in run.summary
    assert artifact.recorded(folder) == []
    assert [p.name for p in (tmp_path / "outputs" / "diverge1").iterdir()] == []  # no ONNX, .tmp or NaN checkpoint


def test_a_checkpoint_holding_a_nan_weight_is_refused_in_one_line_before_the_run_opens(tmp_path: Path,
                                                                                      small_data: Path):
    from app import checkpoint, sources

    env = small_run_env(tmp_path, small_data, "nanckpt1")
    folder = _saved_run(tmp_path / "outputs" / "nanckpt1", sources.load([], env, dotenv_path=None))
    state = torch.load(folder / checkpoint.FILE, weights_only=True)
    state["model"]["fc.weight"][3, 7] = float("nan")
    torch.save(state, folder / checkpoint.FILE)

    proc = run_app(["train"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    assert line == (f"error: checkpoint {folder / checkpoint.FILE} holds NaN or infinite values in fc.weight (a "
                    "diverged run's weights): training cannot continue from it; delete it to train this run again, "
                    "or set resume=false"), proc.stderr[-2000:]
    assert runlog.find(tmp_path / "runs") == []  # refused before W&B opened a run


# --- the pieces ---

def test_pick_device():
    from app.config import Config

    assert pick_device(Config(device="cpu")) == torch.device("cpu")
    assert pick_device(Config()).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"device='cuda:99' but"):
        pick_device(Config(device="cuda:99"))


def test_save_checkpoint_replaces_whole_files(tmp_path: Path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, epoch=1, weights=torch.ones(3))
    save_checkpoint(path, epoch=2, weights=torch.zeros(3))
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 2 and torch.equal(state["weights"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_request_turns_a_signal_into_a_flag(signum):
    before = signal.getsignal(signum)
    with StopRequest() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        assert stop.signum == signum  # still running: the loop decides when to stop
    assert signal.getsignal(signum) is before
    assert interrupts.requested() == signum  # noted for the agent around the run, then cleared for the next test
    interrupts.clear()
    stopped = Preempted(signum)
    assert stopped.signum == signum and signal.Signals(signum).name in str(stopped)


def test_export_onnx_is_checked_against_torch(tmp_path: Path):
    torch.manual_seed(0)
    model = ConvNet((4, 8), 10).to(memory_format=torch.channels_last)
    sample = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    result = export_onnx(model, 0.1307, 0.3081, sample, tmp_path / "model.onnx")
    assert result["onnx_checked_images"] == 16 and result["onnx_argmax_agreement"] == 1.0
    assert result["onnx_max_abs_diff"] < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    # a model that disagrees with the file is refused
    other = Normalized(ConvNet((4, 8), 10), 0.1307, 0.3081).eval()
    with pytest.raises(ExportError, match="ONNX export disagrees with torch"):
        verify(tmp_path / "model.onnx", other, sample.float().div(255))


@pytest.mark.parametrize("scale", [1e4, 1e6, 1e8])
def test_export_judges_agreement_relative_to_the_logits_scale(tmp_path: Path, scale: float):
    """A model trained with a high learning rate has logits of 1e4..1e8: onnxruntime and torch then differ
    by far more than 1e-4 in absolute terms (their sums run in other orders) while every class agrees.
    Within 1e-4 of each image's largest |logit|, and the same argmax, is the same model."""
    for seed in range(5):
        torch.manual_seed(seed)
        model = ConvNet((4, 8), 10)
        with torch.no_grad():  # the same model with its logits `scale` times larger
            model.fc.weight.mul_(scale)
            model.fc.bias.mul_(scale)
        sample = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        result = export_onnx(model, 0.1307, 0.3081, sample, tmp_path / f"model-{seed}.onnx")
        assert result["onnx_argmax_agreement"] == 1.0, seed


def test_a_model_with_nan_weights_is_not_exported_and_leaves_no_file(tmp_path: Path):
    model = ConvNet((4, 8), 10)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    sample = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(ExportError, match=r"the model's logits are not finite \(NaN or inf\)"):
        export_onnx(model, 0.1307, 0.3081, sample, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


# --- the resume rule (app.checkpoint): which rerun of a run id may continue it ---

def _saved_run(folder: Path, config, epoch: int = 1) -> Path:
    from app import checkpoint

    from app.model import ConvNet

    folder.mkdir(parents=True, exist_ok=True)
    model = ConvNet(config.kernels, config.classes)  # the structure train() writes (the resume rule checks it)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    checkpoint.save(folder / checkpoint.FILE, model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch,
                    examples_seen=100, epoch_examples=0, generator=torch.Generator().get_state(),
                    config=config.to_dict(), run_id="r1")
    return folder


def test_resume_rule_refuses_other_training_settings_and_allows_the_rest(tmp_path: Path):
    from app import checkpoint
    from app.config import Config

    base = Config(epochs=2, kernels=(16, 32), learning_rate=0.01)
    folder = _saved_run(tmp_path / "r1", base)
    assert checkpoint.check_resume(base, folder, "r1")["epoch"] == 1
    # where and how fast it runs may change, and epochs may grow
    assert checkpoint.check_resume(base.replace(device="cpu", channels_last=False, epochs=5, log_interval=3),
                                   folder, "r1") is not None
    with pytest.raises(checkpoint.ResumeRefused, match=r"kernels 16,32 -> 8; learning_rate 0.01 -> 0.02"):
        checkpoint.check_resume(base.replace(kernels="8", learning_rate=0.02), folder, "r1")
    assert checkpoint.check_resume(base.replace(kernels="8", resume=False), folder, "r1") is None  # start over on purpose


def test_resume_rule_refuses_fewer_epochs_a_finished_run_and_a_damaged_checkpoint(tmp_path: Path):
    from app import checkpoint
    from app.config import Config

    folder = _saved_run(tmp_path / "r1", Config(epochs=3), epoch=3)
    with pytest.raises(checkpoint.ResumeRefused, match=r"epochs=2 but run r1 already trained 3 epoch\(s\)"):
        checkpoint.check_resume(Config(epochs=2), folder, "r1")
    (folder / checkpoint.EXPORT).write_bytes(b"onnx")
    with pytest.raises(checkpoint.ResumeRefused, match="run r1 already finished"):
        checkpoint.check_resume(Config(epochs=3), folder, "r1")
    broken = _saved_run(tmp_path / "r2", Config())
    blob = (broken / checkpoint.FILE).read_bytes()
    (broken / checkpoint.FILE).write_bytes(blob[:len(blob) // 3])
    with pytest.raises(UserError, match="is damaged or not a checkpoint"):
        checkpoint.check_resume(Config(), broken, "r2")
    assert checkpoint.check_resume(Config(), tmp_path / "none", "r3") is None
