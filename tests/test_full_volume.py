"""A full volume under every place a run writes: one line naming the file or folder and "No space left on
device", a non-zero exit, nothing half-written left behind (no *.tmp, *.part, *.partial) and nothing that
was on disk before lost (an older checkpoint, model, copy or bundle stays whole and loadable).

Each place gets a small tmpfs of its own (conftest.volume, root only), filled to the last byte
(conftest.fill) at the moment that place is written. The report's case is in test_report.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, clean_env, error_lines, fill, run_app, volume

from app import checkpoint, places
from app.container import bundle
from app.errors import UserError
from app.export import export_onnx
from app.model import ConvNet

NO_SPACE = "No space left on device"
LEFTOVERS = ("*.tmp", "*.part", "*.partial")


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for pattern in LEFTOVERS for p in folder.rglob(pattern))  # hidden ones too


def tiny_model(seed: int) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet([4, 8], 10)


def test_a_checkpoint_on_a_full_volume_is_one_line_and_the_previous_one_stays_loadable(tmp_path):
    with volume(tmp_path / "vol", "1m") as vol:
        path = vol / "checkpoint.pt"
        old = tiny_model(0).state_dict()
        checkpoint.save(path, model=old, epoch=1)
        fill(vol)
        with pytest.raises(UserError) as refused:
            checkpoint.save(path, model=tiny_model(1).state_dict(), epoch=2)
        message = str(refused.value)
        assert "\n" not in message and str(path) in message and NO_SPACE in message, message
        assert leftovers(vol) == []
        kept = torch.load(path, weights_only=True)
        assert kept["epoch"] == 1 and all(torch.equal(kept["model"][k], v) for k, v in old.items())


def test_an_onnx_export_on_a_full_volume_is_one_line_and_the_older_model_stays(tmp_path):
    """Before: an OSError traceback and model.onnx.tmp left beside the model."""
    import onnxruntime as ort

    sample = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with volume(tmp_path / "vol", "1m") as vol:
        path = vol / "model.onnx"
        export_onnx(tiny_model(0), 0.1, 0.3, sample, path)
        before = path.read_bytes()
        fill(vol)
        with pytest.raises(UserError) as refused:
            export_onnx(tiny_model(1), 0.1, 0.3, sample, path)
        message = str(refused.value)
        assert "\n" not in message and str(path) in message and NO_SPACE in message, message
        assert leftovers(vol) == [] and not (vol / "model.onnx.tmp").exists()
        assert path.read_bytes() == before
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # still a whole model


def test_a_copy_into_a_full_volume_is_whole_or_not_at_all(tmp_path):
    """The copies a run makes into its W&B run folder (the model for the run's files, the model artifact's
    files) go through places.copy_file: a copy already there stays, no partial file is left."""
    source = tmp_path / "model.onnx"
    source.write_bytes(b"new model " * 20_000)
    with volume(tmp_path / "vol", "1m") as vol:
        target = vol / "model-artifact" / "model.onnx"
        target.parent.mkdir()
        target.write_bytes(b"older copy")
        fill(vol)
        with pytest.raises(UserError) as refused:
            places.copy_file(source, target, "the model artifact", "free space")
        message = str(refused.value)
        assert "\n" not in message and str(target) in message and NO_SPACE in message, message
        assert leftovers(vol) == [] and target.read_bytes() == b"older copy"
        assert source.read_bytes() == b"new model " * 20_000


# a real offline W&B run on a volume that fills up after the run opened: the model artifact's copies into
# the run folder (artifact.log_model) cannot be written
LOGS_A_MODEL_ON_A_FULL_VOLUME = textwrap.dedent("""\
    import sys, wandb
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import fill
    from app import artifact, settings
    from app.config import Config
    from app.errors import UserError

    run = wandb.init(project="full", dir={runs!r}, mode="offline")
    fill(Path({volume!r}))
    files = [Path({model!r}), Path({checkpoint!r})]
    try:
        artifact.log_model(run, Config(), files, {{"test_accuracy": 0.5}}, {{"WANDB_DIR": {runs!r}}})
    except UserError as exc:
        print(f"error: {{exc}}", file=sys.stderr)
        sys.exit(2)
    finally:
        run.finish()
""")


def test_the_model_artifact_on_a_full_volume_is_one_line_and_no_partial_copy(tmp_path):
    """Before: an OSError traceback out of shutil.copyfile and a half-written model-artifact/model.onnx."""
    model, ckpt = tmp_path / "model.onnx", tmp_path / "checkpoint.pt"
    model.write_bytes(b"m" * 300_000)  # more than the volume has left
    ckpt.write_bytes(b"c" * 1000)
    with volume(tmp_path / "vol", "4m") as vol:
        driver = LOGS_A_MODEL_ON_A_FULL_VOLUME.format(tests=str(REPO / "tests"), runs=str(vol / "runs"),
                                                      volume=str(vol), model=str(model), checkpoint=str(ckpt))
        proc = subprocess.run([sys.executable, "-c", driver], env=clean_env(tmp_path, WANDB_SILENT="true"),
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        (line,) = error_lines(proc.stderr)
        (copies,) = (vol / "runs" / "wandb").glob("offline-run-*/model-artifact")
        assert line.startswith(f"error: the model artifact: cannot write {copies / 'model.onnx'} ({NO_SPACE})"), line
        assert leftovers(vol) == [] and list(copies.iterdir()) == [], leftovers(vol)
        assert model.read_bytes() == b"m" * 300_000  # the model itself is untouched


# a `python -m app train` whose on_epoch hook (the one an offline sweep's pruner uses) fills a volume after
# the first epoch: the run folder, or the model artifact's folder, fills up while the run trains
FILLS_AFTER_EPOCH_1 = textwrap.dedent("""\
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import fill
    from app import runner

    def on_epoch(epoch, metrics):
        fill(Path({volume!r}))
        return False

    code = runner.handle(lambda: runner.run(runner.prepare([]), on_epoch=on_epoch))
    sys.exit(code)
""")


def train_env(tmp_path: Path, small_data: Path, **folders: str) -> dict[str, str]:
    return clean_env(tmp_path, WANDB_MODE="offline", DATA_DIR=str(small_data), EPOCHS="1", VAL_SIZE="200",
                     KERNELS="4,8", WATCH_LOG="none", WANDB_RUN_ID="fullvol1", **folders)


def test_the_run_folder_filling_up_mid_run_is_one_line_and_the_run_can_finish_later(tmp_path, small_data):
    """WANDB_DIR's volume fills while the run trains: W&B's own log files and the model's copy into the run
    cannot be written. Before: hundreds of "--- Logging error ---" tracebacks, then an OSError traceback, a
    half-written files/model.onnx, and model.onnx left in the outputs (so the run counted as finished)."""
    outputs = tmp_path / "outputs"
    with volume(tmp_path / "vol", "4m") as vol:
        env = train_env(tmp_path, small_data, WANDB_DIR=str(vol / "runs"), OUTPUT_DIR=str(outputs))
        driver = FILLS_AFTER_EPOCH_1.format(tests=str(REPO / "tests"), volume=str(vol))
        proc = subprocess.run([sys.executable, "-c", driver], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=180)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out[-3000:]
        assert "Traceback" not in out and "Logging error" not in out, out[-3000:]
        (line,) = error_lines(proc.stderr)
        assert NO_SPACE in line and str(vol / "runs") in line, line
        assert leftovers(vol) == [], leftovers(vol)
        run_dir = outputs / "fullvol1"
        assert not (run_dir / "model.onnx").exists()  # not finished: a rerun of the id exports it
        assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1

        (vol / ".filler").unlink()  # space again: the same run id resumes its checkpoint and finishes
        again = run_app(["train"], env, tmp_path, timeout=180)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "1 epoch(s) done" in again.stdout and (run_dir / "model.onnx").exists(), again.stdout[-2000:]


@pytest.mark.parametrize("setting", ["WANDB_DIR", "OUTPUT_DIR"])
def test_a_full_volume_is_refused_before_the_run_starts(tmp_path, small_data, setting):
    """Before: a full OUTPUT_DIR trained an epoch before its checkpoint failed; a full WANDB_DIR trained the
    whole run under hundreds of W&B "Logging error" tracebacks and ended in an OSError traceback."""
    with volume(tmp_path / "vol", "1m") as vol:
        fill(vol)
        folders = {"WANDB_DIR": str(tmp_path / "runs"), "OUTPUT_DIR": str(tmp_path / "outputs")}
        folders[setting] = str(vol / "here")
        proc = run_app(["train"], train_env(tmp_path, small_data, **folders), tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        (line,) = error_lines(proc.stderr)
        assert line == (f"error: {setting}='{vol / 'here'}': its volume is full ({NO_SPACE}); free space there or "
                        "choose a folder on another volume"), line
        assert not list(Path(folders["WANDB_DIR"]).glob("wandb/offline-run-*"))  # no W&B run was opened


def test_a_bundle_on_a_full_volume_is_one_line_and_the_older_bundle_stays(tmp_path):
    """bundle save's archive writer on real files (the image member is a plain file here: `docker save`
    on a full volume fails in docker itself, said as `docker save IMAGE failed: ...`). Before: an OSError
    traceback and OUT.tar.partial left beside the older bundle."""
    image = tmp_path / "image.tar"
    image.write_bytes(hashlib.sha256(b"x").digest() * 40_000)  # 1.3 MB: more than the volume holds
    members = [(image, bundle.IMAGE_MEMBER), (REPO / "docker-compose.yml", "project/docker-compose.yml")]
    with volume(tmp_path / "vol", "2m") as vol:
        out = vol / "bundle.tar"
        bundle.write_archive(out, members[1:], {"image": "old"})
        before = out.read_bytes()
        fill(vol)
        with pytest.raises(UserError) as refused:
            bundle.write_archive(out, members, {"image": "new"})
        message = str(refused.value)
        assert "\n" not in message and str(out) in message and NO_SPACE in message, message
        assert "the bundle already there is kept" in message
        assert leftovers(vol) == [] and out.read_bytes() == before
        with tarfile.open(out) as tar:
            assert "project/docker-compose.yml" in tar.getnames()


def test_bundle_save_onto_a_full_volume_is_one_line_before_docker_is_asked(tmp_path):
    """Checked before `docker save` writes gigabytes beside the archive: no engine is needed to see it.
    Before: `docker save` failed into a temporary folder on the full volume (or, where a folder takes a
    block, as ext4's do, making that folder was an OSError traceback)."""
    with volume(tmp_path / "vol", "1m") as vol:
        fill(vol)
        proc = run_app(["bundle", "save", str(vol / "carry" / "b.tar"), "--image", "nothing:here"],
                       clean_env(tmp_path), tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = error_lines(proc.stderr)
        assert line == (f"error: the bundle's folder '{vol / 'carry'}': its volume is full ({NO_SPACE}); free space "
                        "there or choose a folder on another volume"), line
        assert sorted(p.name for p in vol.iterdir()) == [".filler"]


def test_whole_or_nothing_writes_keep_the_mode_a_plain_write_gives(tmp_path: Path):
    """The temporary file a copy or a report goes through is made 0600; what lands must be readable as any
    other file the process writes (the host's other users read the model and the report), under its umask."""
    from app import places

    source = tmp_path / "model.onnx"
    source.write_bytes(b"onnx")
    plain = tmp_path / "plain"
    plain.write_text("x")
    places.copy_file(source, tmp_path / "copy.onnx", "the model", "nothing copied")
    places.write_text(tmp_path / "index.html", "<p>", "the report")
    expected = plain.stat().st_mode & 0o777
    assert expected & 0o044  # the test's own umask lets others read (else it proves nothing)
    assert {oct((tmp_path / n).stat().st_mode & 0o777) for n in ("copy.onnx", "index.html")} == {oct(expected)}
