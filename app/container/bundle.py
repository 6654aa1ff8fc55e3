"""One archive that carries the product to an air-gapped host, and unpacks it there.

    python -m app bundle save OUT.tar --image mnist-sweeps:latest [--data data] [--env .env]
    python -m app bundle load OUT.tar [--into DIR]

`save` puts `docker save IMAGE`, the compose files, the sweep YAMLs, an optional dataset folder and
an optional .env into OUT.tar (OUT.tar.gz compresses), with a manifest of sha256 sums. A W&B API key
is never carried: the air-gapped host runs offline, and the copy of .env gets an empty WANDB_API_KEY.
`load` checks every sum, `docker load`s the image and lays the files out as a compose project folder
(data/, runs/, outputs/), keeping an existing .env. The steps around it are in docs/airgap.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from app.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("docker-compose.yml", "docker-compose.cpu.yml", ".env.example")
MANIFEST = "bundle.json"
IMAGE_MEMBER = "image.tar"
SECRET = re.compile(r"^(\s*(?:export\s+)?WANDB_API_KEY\s*=).*$", re.M)


def _docker() -> str:
    docker = shutil.which("docker")
    if docker is None:
        raise UserError("bundle needs the docker client (and a running engine): apt-get install docker.io")
    return docker


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _image_id(docker: str, image: str) -> str:
    proc = subprocess.run([docker, "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"--image {image}: no such image in the local engine (build it first: scripts/build-image --tag {image})")
    return proc.stdout.strip()


def save(out: Path, image: str, data: Path | None, env_file: Path | None) -> dict:
    docker = _docker()
    image_id = _image_id(docker, image)
    if data is not None and not data.is_dir():
        raise UserError(f"--data {str(data)!r} is not a folder")
    if env_file is not None and not env_file.is_file():
        raise UserError(f"--env {str(env_file)!r} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if out.name.endswith((".tar.gz", ".tgz")) else "w"
    files: dict[str, str] = {}
    partial = out.with_name(out.name + ".partial")  # a crash never leaves a half archive under the real name
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        image_tar = Path(tmp) / IMAGE_MEMBER
        proc = subprocess.run([docker, "save", "--output", str(image_tar), image], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"docker save {image} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        with tarfile.open(partial, mode) as tar:
            def add(path: Path, name: str) -> None:
                files[name] = _sha256(path)
                tar.add(path, arcname=name, recursive=False)

            add(image_tar, IMAGE_MEMBER)
            for name in PROJECT_FILES:
                if (REPO / name).is_file():
                    add(REPO / name, f"project/{name}")
            for y in sorted((REPO / "sweeps").glob("*.yaml")):
                add(y, f"project/sweeps/{y.name}")
            if env_file is not None:
                text, stripped = SECRET.subn(r"\1", env_file.read_text())
                clean = Path(tmp) / "env"
                clean.write_text(text)
                add(clean, "project/.env")
                if stripped:
                    print("bundle: WANDB_API_KEY left out of the bundled .env (offline hosts need none)")
            if data is not None:
                for path in sorted(p for p in data.rglob("*") if p.is_file()):
                    add(path, f"project/data/{path.relative_to(data).as_posix()}")
            manifest = {"image": image, "image_id": image_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "files": files}
            blob = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime = len(blob), int(time.time())
            tar.addfile(info, io.BytesIO(blob))
    os.replace(partial, out)
    return manifest


def _member_sha(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    h = hashlib.sha256()
    f = tar.extractfile(member)
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def load(archive: Path, into: Path) -> dict:
    docker = _docker()
    if not archive.is_file():
        raise UserError(f"bundle {str(archive)!r} does not exist")
    try:
        tar = tarfile.open(archive)
    except tarfile.TarError as exc:
        raise UserError(f"{archive} is not a bundle archive ({exc})") from None
    with tar:
        try:
            manifest = json.load(tar.extractfile(MANIFEST))
        except KeyError:
            raise UserError(f"{archive} has no {MANIFEST}: not made by `python -m app bundle save`") from None
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name, digest in manifest["files"].items():
            if name not in members or _member_sha(tar, members[name]) != digest:
                raise UserError(f"{archive}: {name} is missing or damaged (sha256 differs); copy the bundle again")
        # the image streams from the archive into the engine: no second copy on disk
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([docker, "load"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
            with tar.extractfile(members[IMAGE_MEMBER]) as src:
                try:
                    shutil.copyfileobj(src, proc.stdin, 1 << 20)
                except BrokenPipeError:
                    pass  # docker load stopped reading: its exit status and message say why
            proc.stdin.close()
            if proc.wait() != 0:
                err.seek(0)
                lines = err.read().decode(errors="replace").strip().splitlines() or ["?"]
                raise UserError(f"docker load failed: {lines[-1]}")
        into.mkdir(parents=True, exist_ok=True)
        kept = []
        for name in manifest["files"]:
            if not name.startswith("project/"):
                continue
            target = into / name[len("project/"):]
            if ".." in Path(name).parts:
                raise UserError(f"{archive}: unsafe path {name}")
            if name == "project/.env" and target.exists():
                target = into / ".env.bundle"  # never overwrite the host's own settings
                kept.append(".env (the bundled one is .env.bundle)")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(members[name]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        for folder in ("data", "runs", "outputs"):
            (into / folder).mkdir(exist_ok=True)
    if _image_id(docker, manifest["image"]) != manifest["image_id"]:
        raise UserError(f"docker load gave {manifest['image']} a different id than the bundle recorded")
    manifest["kept"] = kept
    return manifest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app bundle",
                                     description="Carry the image, compose files, sweeps, data and settings to an air-gapped host.")
    sub = parser.add_subparsers(dest="action", required=True)
    s = sub.add_parser("save", help="write the bundle archive (on the connected host)")
    s.add_argument("out", help="archive to write: .tar, or .tar.gz to compress")
    s.add_argument("--image", default="mnist-sweeps:latest", help="image tag to carry (default mnist-sweeps:latest)")
    s.add_argument("--data", help="dataset folder to carry as data/ (e.g. ./data with FashionMNIST/raw)")
    s.add_argument("--env", help="settings file to carry as .env (WANDB_API_KEY is emptied)")
    ld = sub.add_parser("load", help="docker load the image and unpack the project (on the air-gapped host)")
    ld.add_argument("archive")
    ld.add_argument("--into", default=".", help="project folder to unpack into (default: .)")
    args = parser.parse_args(argv)
    if args.action == "save":
        m = save(Path(args.out), args.image, Path(args.data) if args.data else None, Path(args.env) if args.env else None)
        size = Path(args.out).stat().st_size / 1e9
        print(f"bundle written: {args.out} ({size:.2f} GB, image {m['image']}, {len(m['files'])} files)")
        return 0
    m = load(Path(args.archive), Path(args.into))
    print(f"loaded image {m['image']} and unpacked the project into {Path(args.into).resolve()}"
          + (f"; kept the existing {', '.join(m['kept'])}" if m["kept"] else ""))
    print("next: see docs/airgap.md (docker compose -f docker-compose.yml -f docker-compose.cpu.yml up agent --scale agent=3)")
    return 0
