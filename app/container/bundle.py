"""One archive that carries the product to an air-gapped host, and unpacks it there.

    python -m app bundle save OUT.tar --image mnist-sweeps:latest [--data data] [--env .env]
    python -m app bundle load OUT.tar [--into DIR]

`save` puts `docker save IMAGE`, the compose files, the sweep YAMLs, docs/airgap.md, an optional dataset
folder and a .env into OUT.tar (OUT.tar.gz compresses), with a manifest of sha256 sums; into a plain tar
the image streams straight from `docker save`, never copied to disk first. The .env is the
given one (or an empty one) with `IMAGE=` set to the image carried: compose then runs that image on the
other host instead of building one. A W&B API key is never carried: the air-gapped host runs offline,
and the copy of .env gets an empty WANDB_API_KEY. Both commands say what they are doing as they go
(app.container.meter): a few GB take minutes.
`load` checks the whole archive before it writes anything or runs `docker load`: only regular files
and folders, every name confined under the target folder, nothing the manifest does not list, the
sizes against a cap and the free space, every sha256. Then it `docker load`s the image and lays the
files out as a compose project folder (data/, runs/, outputs/), keeping an existing .env. The steps
around it are in docs/airgap.md.
"""

from __future__ import annotations

import argparse
import contextlib
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
import zlib
from pathlib import Path

from app import places
from app.container import images
from app.container.meter import Meter, Reader
from app.errors import UserError

REPO = Path(__file__).resolve().parents[2]  # app/container/bundle.py -> the repository
PROJECT_FILES = ("docker-compose.yml", "docker-compose.cpu.yml", ".env.example", "docs/airgap.md")
MANIFEST = "bundle.json"
IMAGE_MEMBER = "image.tar"
MAX_MEMBERS = 100_000  # the image, compose files, sweeps and a dataset: a few hundred
MAX_BYTES = 64 << 30  # everything in a bundle: the image (a few GB) and a dataset
MAX_MANIFEST = 16 << 20
MAX_NAME = 1000  # characters in a member's name: project paths are far shorter
FREE_MARGIN = 256 << 20  # left free under --into after unpacking
SECRET = re.compile(r"^(\s*(?:export\s+)?WANDB_API_KEY\s*=).*$", re.M)
IMAGE_LINE = re.compile(r"^\s*(?:export\s+)?IMAGE\s*=.*$", re.M)


def with_image(text: str, image: str) -> str:
    """A .env's text with IMAGE= set to `image` (the line replaced where there is one): compose reads it."""
    line = f"IMAGE={image}"
    if IMAGE_LINE.search(text):
        return IMAGE_LINE.sub(lambda _: line, text, count=1)
    return text + ("" if not text or text.endswith("\n") else "\n") + \
        f"# the image this bundle carries: docker compose runs it instead of building one\n{line}\n"


def _stream_image(docker: str, image: str, size: int, f) -> str:
    """`docker save IMAGE` straight into the open archive `f` as its first member, hashed as it passes: the
    image is never on disk twice (a temporary copy, then the archive). A tar header holds its member's size,
    so a blank one goes first and the real one over it at the end (GNU format: one 512-byte block for any
    size). Returns the member's sha256."""
    start = f.tell()
    f.write(bytes(tarfile.BLOCKSIZE))
    digest, n = images.save_into(docker, image, size, f)
    f.write(bytes(-n % tarfile.BLOCKSIZE))
    info = tarfile.TarInfo(IMAGE_MEMBER)
    info.size, info.mtime, info.mode = n, int(time.time()), 0o644
    end = f.tell()
    f.seek(start)
    f.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    f.seek(end)
    return digest


def save(out: Path, image: str, data: Path | None, env_file: Path | None) -> dict:
    # first: `docker save` writes gigabytes beside OUT before anything else would notice
    places.check_folder(out.parent, "the bundle's folder")
    docker = images.client()
    image_id, image_size = images.inspect(docker, image)
    if data is not None and not data.is_dir():
        raise UserError(f"--data {str(data)!r} is not a folder")
    if env_file is not None and not env_file.is_file():
        raise UserError(f"--env {str(env_file)!r} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        settings = ""
        if env_file is not None:
            settings, stripped = SECRET.subn(r"\1", env_file.read_text())
            if stripped:
                print("bundle: WANDB_API_KEY left out of the bundled .env (offline hosts need none)")
        clean = Path(tmp) / "env"
        clean.write_text(with_image(settings, image))
        members = [(REPO / name, f"project/{name}") for name in PROJECT_FILES if (REPO / name).is_file()]
        members += [(y, f"project/sweeps/{y.name}") for y in sorted((REPO / "sweeps").glob("*.yaml"))]
        members.append((clean, "project/.env"))
        if data is not None:
            members += [(p, f"project/data/{p.relative_to(data).as_posix()}")
                        for p in sorted(p for p in data.rglob("*") if p.is_file())]
        head = {"image": image, "image_id": image_id}
        if _compressed(out):  # a gzip stream cannot go back to write the image's header: a copy first
            image_tar = Path(tmp) / IMAGE_MEMBER
            with open(image_tar, "wb") as f:
                images.save_into(docker, image, image_size, f)
            return write_archive(out, [(image_tar, IMAGE_MEMBER), *members], head)
        return write_archive(out, members, head, first=lambda f: _stream_image(docker, image, image_size, f))


def _compressed(out: Path) -> bool:
    return out.name.endswith((".tar.gz", ".tgz"))


def write_archive(out: Path, members: list[tuple[Path, str]], head: dict, first=None) -> dict:
    """`members` (path, name in the archive) and a manifest (`head` + when + every member's sha256) into
    `out`, whole or not at all: written as OUT.partial, renamed at the end. `first(f)`, on an uncompressed
    archive, writes the image member itself into the open file and returns its sha256. A full or read-only
    volume is one line naming the archive; the partial file is removed and a bundle already at `out` stays
    as it was; so is a `docker save` that fails or is stopped half-way."""
    partial = out.with_name(out.name + ".partial")  # a crash never leaves a half archive under the real name
    files: dict[str, str] = {}
    total = sum(path.stat().st_size for path, _ in members)
    try:
        with open(partial, "wb") as f:
            if first is not None:
                files[IMAGE_MEMBER] = first(f)
            with tarfile.open(fileobj=f, mode="w:gz" if _compressed(out) else "w") as tar, \
                    Meter(f"writing {out.name}", total) as meter:
                for path, name in members:
                    info = tar.gettarinfo(path, arcname=name)
                    digest = hashlib.sha256()
                    with open(path, "rb") as src:
                        tar.addfile(info, Reader(src, meter, digest))  # hashed as it is written: one read
                    files[name] = digest.hexdigest()
                manifest = {**head, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
                blob = json.dumps(manifest, indent=1).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mtime = len(blob), int(time.time())
                tar.addfile(info, io.BytesIO(blob))
        os.replace(partial, out)
    except OSError as exc:
        _drop(partial)
        raise UserError(f"cannot write the bundle {out} ({exc.strerror or exc}); nothing half-written is left"
                        + (" and the bundle already there is kept" if out.exists() else "")
                        + ": free space on that volume or write the bundle elsewhere") from None
    except BaseException:  # docker save failed, a stop: no half archive either
        _drop(partial)
        raise
    return manifest


def _drop(partial: Path) -> None:
    with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)


def _member_sha(tar: tarfile.TarFile, member: tarfile.TarInfo, meter: Meter | None = None) -> str:
    h = hashlib.sha256()
    f = tar.extractfile(member)
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
        if meter is not None:
            meter.add(len(block))
    return h.hexdigest()


def _safe_name(name: str) -> bool:
    """A relative POSIX path with no `..`, no empty or `.` parts, nothing a shell or Windows reads oddly."""
    parts = name.split("/")
    return (bool(name) and not name.startswith("/") and "\\" not in name and "\0" not in name
            and all(part not in ("", ".", "..") for part in parts))


def check_archive(tar: tarfile.TarFile, archive: Path, into: Path) -> tuple[dict, dict[str, tarfile.TarInfo]]:
    """Every member checked before anything is written or loaded: only regular files and folders, each
    name confined under the target (no absolute path, no `..`), no name twice, nothing the manifest does
    not list, sizes within MAX_BYTES and the free space under `into`, and every sha256 as recorded."""
    members: dict[str, tarfile.TarInfo] = {}
    total = 0
    for i, m in enumerate(tar):
        if i >= MAX_MEMBERS:
            raise UserError(f"{archive}: over {MAX_MEMBERS} members; not a bundle")
        name = m.name[:-1] if m.isdir() and m.name.endswith("/") else m.name
        if len(name) > MAX_NAME:  # what `bundle save` never writes; said as what it is, not as "unsafe"
            raise UserError(f"{archive}: member {name[:60]!r}... has a name too long ({len(name)} characters; a "
                            f"bundle's are at most {MAX_NAME}); refused, nothing written")
        if not _safe_name(name):
            raise UserError(f"{archive}: member {name[:80]!r} has an unsafe path (absolute, `..` or odd); refused, "
                            "nothing written")
        if not (m.isreg() or m.isdir()):
            kind = "link" if m.issym() or m.islnk() else "device or fifo" if m.isdev() else "special file"
            raise UserError(f"{archive}: member {name[:80]!r} is a {kind}; a bundle holds only files and folders")
        if name in members:
            raise UserError(f"{archive}: member {name[:80]!r} appears twice; refused, nothing written")
        # a name the file system refuses would fail half-way through unpacking, after `docker load`
        places.check_name(into / name.removeprefix("project/"), f"{archive}: member")
        members[name] = m
        total += m.size
        if total > MAX_BYTES:
            raise UserError(f"{archive}: members add up to over {MAX_BYTES >> 30} GiB; not a bundle")
    if MANIFEST not in members or members[MANIFEST].size > MAX_MANIFEST:
        raise UserError(f"{archive} has no {MANIFEST} (or one over {MAX_MANIFEST >> 10} KiB): "
                        "not made by `python -m app bundle save`")
    try:
        manifest = json.loads(tar.extractfile(members[MANIFEST]).read())
        files = manifest["files"]
        assert isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
        assert isinstance(manifest["image"], str) and isinstance(manifest["image_id"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{archive}: {MANIFEST} is not a bundle manifest") from None
    extra = sorted(n for n, m in members.items() if m.isreg() and n != MANIFEST and n not in files)
    if extra:
        raise UserError(f"{archive}: member {extra[0][:80]!r} is not in {MANIFEST}; refused, nothing written")
    if IMAGE_MEMBER not in files or any(n != IMAGE_MEMBER and not n.startswith("project/") for n in files):
        raise UserError(f"{archive}: {MANIFEST} lists files outside image.tar and project/; not a bundle")
    project_bytes = sum(members[n].size for n in files if n in members and n.startswith("project/"))
    free = shutil.disk_usage(_existing_parent(into)).free
    if project_bytes + FREE_MARGIN > free:
        raise UserError(f"{archive}: unpacking needs {project_bytes / 1e9:.2f} GB in {into} but "
                        f"{free / 1e9:.2f} GB are free; free some space or pick --into elsewhere")
    checked = sum(members[n].size for n in files if n in members)
    with Meter(f"checking {archive.name}", checked) as meter:
        for name, digest in files.items():
            if name not in members or not members[name].isreg() or _member_sha(tar, members[name], meter) != digest:
                raise UserError(f"{archive}: {name[:80]} is missing or damaged (sha256 differs); copy the bundle again")
    return manifest, members


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def load(archive: Path, into: Path) -> dict:
    docker = images.client()
    if not archive.is_file():
        raise UserError(f"bundle {str(archive)!r} does not exist")
    if into.exists() and not into.is_dir():
        raise UserError(f"--into {str(into)!r} is not a folder")
    try:
        tar = tarfile.open(archive)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{archive} is not a bundle archive ({exc})") from None
    with tar:
        try:
            manifest, members = check_archive(tar, archive, into)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # cut short or corrupt compression
            raise UserError(f"{archive} is damaged ({type(exc).__name__}); copy the bundle again") from None
        # the image streams from the archive into the engine: no second copy on disk
        image = members[IMAGE_MEMBER]
        with tempfile.TemporaryFile() as err, Meter(f"docker load {manifest['image']}", image.size) as meter:
            proc = subprocess.Popen([docker, "load"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
            with tar.extractfile(image) as src:
                try:
                    shutil.copyfileobj(Reader(src, meter), proc.stdin, 1 << 20)
                except BrokenPipeError:
                    pass  # docker load stopped reading: its exit status and message say why
            proc.stdin.close()
            if proc.wait() != 0:
                err.seek(0)
                lines = err.read().decode(errors="replace").strip().splitlines() or ["?"]
                raise UserError(f"docker load failed: {lines[-1][:200]}")
        into.mkdir(parents=True, exist_ok=True)
        kept = []
        for name in manifest["files"]:
            if not name.startswith("project/"):
                continue
            target = into / name[len("project/"):]
            if name == "project/.env" and target.exists():
                target = into / ".env.bundle"  # never overwrite the host's own settings
                kept.append(".env (the bundled one is .env.bundle)")
                if not re.search(rf"^\s*IMAGE\s*=\s*{re.escape(manifest['image'])}\s*$", into.joinpath(".env").read_text(errors="replace"), re.M):
                    kept.append(f"add IMAGE={manifest['image']} to it, or compose builds an image instead of running this one")
            target.parent.mkdir(parents=True, exist_ok=True)
            # write beside, then rename: an existing symlink at the target is replaced, never followed
            tmp = target.with_name(f".{target.name}.bundle-tmp")
            with tar.extractfile(members[name]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)
        for folder in ("data", "runs", "outputs"):
            (into / folder).mkdir(exist_ok=True)
    if images.inspect(docker, manifest["image"])[0] != manifest["image_id"]:
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
    into = Path(args.into).resolve()
    print(f"loaded image {m['image']} and unpacked the project into {into}"
          + (f"; kept the existing {'; '.join(m['kept'])}" if m["kept"] else ""))
    print(f"next: see {into / 'docs' / 'airgap.md'} (in {into}: docker compose run --rm train, or "
          "docker compose up agent --scale agent=3)")
    return 0
