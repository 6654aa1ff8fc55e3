"""The hash-locked requirements/*.txt match their inputs: pyproject.toml, requirements/*.in.

    .venv/bin/python -m pytest -q tests/test_locks.py

A failure here means an input changed without `scripts/lock` being rerun (or a lock was edited by hand).
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REQ = Path(__file__).resolve().parents[1] / "requirements"
LOCKS = ("torch", "app", "dev")
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)")


def entries(lock: str) -> list[tuple[str, str, str]]:
    """(name, version, the entry's text) for every package in requirements/LOCK.txt."""
    text = (REQ / f"{lock}.txt").read_text()
    found = []
    for block in re.split(r"\n(?=\S)", text):
        if match := PIN.match(block):
            found.append((canonicalize_name(match[1]), match[2], block))
    return found


def inputs(path: Path) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_every_locked_package_is_pinned_with_hashes():
    for lock in LOCKS:
        found = entries(lock)
        assert found, f"requirements/{lock}.txt lists nothing"
        unhashed = [name for name, _, block in found if "--hash=sha256:" not in block]
        assert not unhashed, f"requirements/{lock}.txt: no hash for {unhashed}"


def test_no_package_is_in_two_locks():
    owner: dict[str, str] = {}
    for lock in LOCKS:
        for name, _, _ in entries(lock):
            assert owner.setdefault(name, lock) == lock, f"{name} is in requirements/{owner[name]}.txt and {lock}.txt"


def test_the_locks_satisfy_every_input():
    project = tomllib.loads((REQ.parent / "pyproject.toml").read_text())["project"]
    wanted = {
        "torch": inputs(REQ / "torch.in"),
        "app": [Requirement(r) for r in project["dependencies"]] + inputs(REQ / "image.in"),
        "dev": [Requirement(r) for r in project["optional-dependencies"]["dev"]] + inputs(REQ / "dev.in"),
    }
    locked: dict[str, list[str]] = {}
    for lock in LOCKS:
        for name, version, _ in entries(lock):
            locked.setdefault(name, []).append(version)
    for source, requirements in wanted.items():
        for req in requirements:
            versions = locked.get(canonicalize_name(req.name), [])
            assert any(req.specifier.contains(v, prereleases=True) for v in versions), (
                f"{req} ({source}) is not in requirements/*.txt at a version it allows ({versions}): run scripts/lock")


def test_the_torch_pin_is_written_once_and_locked_as_written():
    pins = {canonicalize_name(r.name): str(r.specifier) for r in inputs(REQ / "torch.in")}
    assert set(pins) == {"torch", "torchvision"}
    locked = {name: version for name, version, _ in entries("torch")}
    for name, spec in pins.items():
        assert spec == f"=={locked[name]}", f"requirements/torch.in says {name}{spec}, torch.txt has {locked[name]}"
    for other in ("Dockerfile", "scripts/build-image", ".ci/run", "scripts/venv", "pyproject.toml"):
        text = (REQ.parent / other).read_text()
        assert not re.search(r"torch(vision)?==\d", text), f"{other} pins torch itself: read requirements/ instead"
