"""Places we write, checked before work starts: a folder that is a file, cannot be made, or is read-only,
and names too long for the file system, are one line naming the place instead of an OSError later.

    places.check_folder(Path("report"), "--out")      # exists as a writable folder, or can be made
    places.check_name(path, "bundle member")           # every component and the whole path fit
    places.file_stem(name)                              # an untrusted name as a bounded file-name stem
    places.copy_file(source, target, what, then)        # whole or not at all; a full volume is one line
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from app.errors import UserError

NAME_MAX = 255  # bytes per path component on Linux file systems (ext4, xfs, overlayfs, NFS)
PATH_MAX = 4096  # bytes per whole path
SPARE = 40  # room for the names written beside a file (".NAME.<uuid>.part", ".tmp", ".bundle-tmp")


def check_name(path: Path, what: str, spare: int = SPARE) -> None:
    """Every component of `path` and the whole of it fit the file system, with `spare` bytes for the
    temporary names written beside it."""
    for part in path.parts:
        if len(part.encode(errors="surrogateescape")) + spare > NAME_MAX:
            raise UserError(f"{what} {str(path)[:80]!r}...: the name {part[:40]!r}... is too long for the file system "
                            f"({len(part.encode(errors='surrogateescape'))} bytes; at most {NAME_MAX - spare})")
    if len(str(path.absolute()).encode(errors="surrogateescape")) + spare > PATH_MAX:
        raise UserError(f"{what} {str(path)[:80]!r}...: the path is too long for the file system (over {PATH_MAX - spare} bytes)")


def check_folder(folder: Path, what: str) -> None:
    """`folder` is a writable folder, or the nearest existing folder above it is (it will be made there)."""
    check_name(folder, what)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise UserError(f"{what} {str(folder)!r} {where}; choose a folder")
    try:
        write_test(existing)
    except OSError as exc:  # read-only, full, or a place that holds no files at all (/proc, /sys)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"{what} {str(folder)!r}: its volume is full (No space left on device); free space there "
                            "or choose a folder on another volume") from None
        raise UserError(f"{what} {str(folder)!r} is not writable ({existing}: {exc.strerror or exc}); "
                        "choose a writable folder") from None


def write_test(folder: Path) -> None:
    """Create and remove a file in `folder`; OSError when that cannot be done."""
    # a fresh name created with O_EXCL: process ids repeat across containers sharing a volume, and a
    # probe named by pid was deleted under another agent's feet
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    try:
        # a byte of data: a full volume still makes empty files (they take no block) but refuses data, and a
        # run on it would train an epoch before its first checkpoint found out
        os.write(fd, b"\0")
    finally:
        os.close(fd)
        os.unlink(probe)


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for W&B's threads meanwhile)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _beside(path: Path) -> tuple[int, str]:
    """A new temporary file next to `path`, with the mode a plain open() would give it: mkstemp's 0600
    would make a model or report copied through it unreadable to the host's other users."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".part", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _whole(target: Path, fill, problem) -> None:
    """`target` made whole or not at all: `fill(fd, tmp)` writes a new file beside it, which is then renamed
    over it. A full or read-only volume is one line, `problem(why)`; no half-written file is left."""
    tmp = None
    try:
        fd, tmp = _beside(target)
        fill(fd, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise UserError(problem(exc.strerror or exc)) from None


def write_text(path: Path, text: str, what: str) -> None:
    """Write `path` whole or not at all. A symlink already at `path` is replaced, never written through; a
    full or read-only volume is one line naming the file, with the file as it was before."""
    def fill(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)

    _whole(path, fill, lambda why: f"{what}: cannot write {path} ({why}); what was there is unchanged")


def copy_file(source: Path, target: Path, what: str, then: str) -> None:
    """Copy `source` to `target` whole or not at all; a full or read-only volume is one line naming the
    file and what `then` happens."""
    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        shutil.copyfile(source, tmp)

    _whole(target, fill, lambda why: f"{what}: cannot write {target} ({why}); {then}")


def file_stem(name: str, limit: int = 100) -> str:
    """`name` as a file-name stem: safe characters, at most `limit` characters; a shortened one ends in a
    hash of the whole, so two long names stay apart."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "runs"
    if len(slug) <= limit:
        return slug
    return f"{slug[:limit - 9]}-{hashlib.sha256(name.encode(errors='surrogateescape')).hexdigest()[:8]}"
