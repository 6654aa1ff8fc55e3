"""The local Docker engine's images through its client, as `bundle` moves them: look one up, stream it out.

The client (`docker`), not the SDK: `docker save` streams gigabytes to a pipe at the engine's pace, and the
bundle reads them once, hashing as they pass (the SDK would buffer the stream through the API's chunks)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile

from app.container.meter import Meter
from app.errors import UserError

BLOCK = 1 << 20


def client() -> str:
    docker = shutil.which("docker")
    if docker is None:
        raise UserError("bundle needs the docker client (and a running engine): apt-get install docker.io")
    return docker


def inspect(docker: str, image: str) -> tuple[str, int]:
    """The image's id and size in bytes."""
    proc = subprocess.run([docker, "image", "inspect", "--format", "{{.Id}} {{.Size}}", image], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"--image {image}: no such image in the local engine (build it first: scripts/build-image --tag {image})")
    image_id, _, size = proc.stdout.strip().partition(" ")
    return image_id, int(size) if size.isdigit() else 0


def save_into(docker: str, image: str, size: int, f) -> tuple[str, int]:
    """`docker save IMAGE` written to the open file `f` as it comes, with progress against `size` (the image's
    own, an estimate of the archive's); returns the bytes' sha256 and count. A failed `docker save` is one
    line with its last words; a write that fails (a full volume) or a stop ends `docker save` too."""
    digest, n = hashlib.sha256(), 0
    with Meter(f"docker save {image}", size) as meter, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([docker, "save", image], stdout=subprocess.PIPE, stderr=err)
        try:
            for block in iter(lambda: proc.stdout.read(BLOCK), b""):
                f.write(block)
                digest.update(block)
                n += len(block)
                meter.at(n)
        except BaseException:
            proc.kill()
            raise
        finally:
            proc.stdout.close()
            proc.wait()
        if proc.returncode != 0:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
            raise UserError(f"docker save {image} failed: {lines[-1] if lines else proc.returncode}")
    return digest.hexdigest(), n
