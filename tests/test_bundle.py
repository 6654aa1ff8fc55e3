"""`python -m app bundle save/load` on the real Docker engine: the image, data and settings make the
round trip through one archive, a damaged archive is refused, and no API key travels.

The stand-in base image (170 MB) plays the image to carry: the round trip is the same for the 6 GB app
image, only slower.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from conftest import clean_env, error_lines, run_app, volume
from containers import docker, ensure_base_image

pytestmark = pytest.mark.container


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bundle_round_trip_on_the_engine(tmp_path):
    base = ensure_base_image()
    tag = f"bundle-test:{uuid.uuid4().hex[:8]}"
    assert docker("tag", base, tag).returncode == 0
    image_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    data = tmp_path / "data" / "FashionMNIST" / "raw"
    data.mkdir(parents=True)
    (data / "train-labels-idx1-ubyte").write_bytes(bytes(range(256)) * 10)
    env_file = tmp_path / "settings.env"
    env_file.write_text("WANDB_MODE=offline\nWANDB_API_KEY=" + "k" * 40 + "\nSWEEP_CONFIG=/app/sweeps/grid.yaml\n")
    env = clean_env(tmp_path)
    archive = tmp_path / "carry" / "bundle.tar"
    try:
        saved = run_app(["bundle", "save", str(archive), "--image", tag, "--data", str(tmp_path / "data"),
                         "--env", str(env_file)], env, tmp_path, timeout=600)
        assert saved.returncode == 0, saved.stderr
        assert "WANDB_API_KEY left out" in saved.stdout
        # not a terminal: a line as each phase starts and one as it ends, with its size, time and rate
        assert re.search(rf"^bundle: docker save {re.escape(tag)} \(.+B\) \.\.\.$", saved.stdout, re.M), saved.stdout
        assert re.search(rf"^bundle: docker save {re.escape(tag)}: [0-9.]+ [kMG]?B in [0-9.]+ s", saved.stdout, re.M), saved.stdout
        assert re.search(r"^bundle: writing bundle.tar: [0-9.]+ [kMG]?B in [0-9.]+ s", saved.stdout, re.M), saved.stdout
        with tarfile.open(archive) as tar:
            names = set(tar.getnames())
            assert {"bundle.json", "image.tar", "project/docker-compose.yml", "project/sweeps/grid.yaml",
                    "project/.env", "project/docs/airgap.md",
                    "project/data/FashionMNIST/raw/train-labels-idx1-ubyte"} <= names
            bundled_env = tar.extractfile("project/.env").read().decode()
            assert "k" * 40 not in bundled_env
            # compose on the other host runs the image carried, instead of building one
            assert f"\nIMAGE={tag}\n" in bundled_env and "SWEEP_CONFIG=/app/sweeps/grid.yaml" in bundled_env

        # the air-gapped host: the image is not there yet
        assert docker("rmi", tag).returncode == 0
        host = tmp_path / "airgapped"
        host.mkdir()
        (host / ".env").write_text("EPOCHS=3\n")  # the host's own settings are kept
        loaded = run_app(["bundle", "load", str(archive), "--into", str(host)], env, tmp_path, timeout=600)
        assert loaded.returncode == 0, loaded.stderr
        assert re.search(r"^bundle: checking bundle.tar: [0-9.]+ [kMG]?B in", loaded.stdout, re.M), loaded.stdout
        assert re.search(rf"^bundle: docker load {re.escape(tag)}: [0-9.]+ [kMG]?B in", loaded.stdout, re.M), loaded.stdout
        # the host's own .env is kept, and it is told what compose needs to run the loaded image
        assert f"add IMAGE={tag} to it" in loaded.stdout, loaded.stdout
        assert (host / "docs" / "airgap.md").is_file() and str(host / "docs" / "airgap.md") in loaded.stdout
        assert docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip() == image_id
        assert digest(host / "data") == digest(tmp_path / "data")
        assert (host / ".env").read_text() == "EPOCHS=3\n"
        assert "SWEEP_CONFIG=/app/sweeps/grid.yaml" in (host / ".env.bundle").read_text()
        assert (host / "docker-compose.yml").is_file() and (host / "runs").is_dir() and (host / "outputs").is_dir()

        # a bundle damaged in transit is refused before anything is loaded
        damaged = tmp_path / "damaged.tar"
        with tarfile.open(archive) as src, tarfile.open(damaged, "w") as dst:
            for member in src.getmembers():
                blob = src.extractfile(member).read() if member.isfile() else None
                if member.name.endswith("train-labels-idx1-ubyte"):
                    blob = b"x" + blob[1:]
                dst.addfile(member, None if blob is None else io.BytesIO(blob))
        refused = run_app(["bundle", "load", str(damaged), "--into", str(tmp_path / "other")], env, tmp_path)
        assert refused.returncode == 2 and len(error_lines(refused.stderr)) == 1
        assert "damaged" in refused.stderr and not (tmp_path / "other").exists()

        # a hostile member (a path out of the target) is refused before `docker load` runs: the image,
        # removed again, stays absent, and nothing lands outside or inside the target
        assert docker("rmi", tag).returncode == 0
        hostile = tmp_path / "hostile.tar"
        with tarfile.open(archive) as src, tarfile.open(hostile, "w") as dst:
            for member in src.getmembers():
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
            evil = tarfile.TarInfo("project/../../escaped")
            evil.size = 4
            dst.addfile(evil, io.BytesIO(b"evil"))
        refused = run_app(["bundle", "load", str(hostile), "--into", str(tmp_path / "third")], env, tmp_path)
        assert refused.returncode == 2 and len(error_lines(refused.stderr)) == 1 and "unsafe path" in refused.stderr
        assert docker("image", "inspect", tag).returncode != 0, "docker load ran for a refused bundle"
        assert not (tmp_path / "third").exists() and not (tmp_path.parent / "escaped").exists()
    finally:
        docker("rmi", "--force", tag)


def test_the_image_streamed_onto_a_volume_that_fills_up_is_one_line_and_no_partial_archive(tmp_path):
    """`docker save` streams into the archive itself (the image is not copied to a temporary file first): a
    volume that fills up mid-stream ends it in one line, with no OUT.tar.partial and no `docker save` left."""
    base = ensure_base_image()
    with volume(tmp_path / "vol", "40m") as vol:  # the stand-in base image is ~170 MB
        proc = run_app(["bundle", "save", str(vol / "b.tar"), "--image", base], clean_env(tmp_path), tmp_path, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = error_lines(proc.stderr)
        assert f"cannot write the bundle {vol / 'b.tar'} (No space left on device); nothing half-written is left" in line
        assert list(vol.iterdir()) == []
    left = subprocess.run(["pgrep", "-f", f"docker save {base}"], capture_output=True, text=True).stdout
    assert left == "", left


def test_bundle_of_a_missing_image_is_one_line(tmp_path):
    ensure_base_image()
    proc = run_app(["bundle", "save", str(tmp_path / "b.tar"), "--image", "no-such-image:never"], clean_env(tmp_path), tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1 and "no such image" in proc.stderr
    assert not (tmp_path / "b.tar").exists()


def test_the_bundled_env_names_the_image_it_carries():
    from app.container.bundle import with_image

    assert with_image("", "mnist-sweeps:v2").endswith("\nIMAGE=mnist-sweeps:v2\n")
    assert with_image("EPOCHS=3", "x:1").startswith("EPOCHS=3\n#")
    # an IMAGE already there is replaced, not repeated: compose would take the first
    replaced = with_image("IMAGE=old:tag\nEPOCHS=3\n", "new:tag")
    assert replaced == "IMAGE=new:tag\nEPOCHS=3\n"
