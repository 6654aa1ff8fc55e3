"""A run's share of its GPU's memory when sweep agents share the GPU through slots.

Agents claim GPU slots (app.container.gpu_slots): one lock file per agent and GPU in GPU_SLOTS_DIR,
held while the agent lives. A run reads, as it starts, how many agents hold a slot on its GPU and caps
its allocator at an equal share (config key gpu_memory_fraction), so agents that joined later count.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
from pathlib import Path
from typing import Mapping

from app import settings


def slots_dir(environ: Mapping[str, str]) -> Path:
    return settings.get("GPU_SLOTS_DIR", environ) or settings.runs_root(environ) / ".gpu-slots"


def is_held(path: Path) -> bool:
    """True when another process holds the slot; probing takes and drops the lock at once."""
    try:
        fd = os.open(path, os.O_RDONLY)  # flock needs no write access: agents may run as different users
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def run_share(environ: Mapping[str, str]) -> float | None:
    """A run's fair share of its GPU's memory: 1/(agents holding a slot on that GPU now), None when alone
    or without a slot. Read when each run starts, so agents that joined after this one are counted."""
    slot = settings.get("GPU_SLOT", environ) or ""
    m = re.fullmatch(r"(gpu-.+)\.slot-\d+", slot)
    if not m:
        return None
    folder = slots_dir(environ)
    try:
        holders = sum(1 for p in folder.glob(f"{glob.escape(m.group(1))}.slot-*.lock") if is_held(p))
    except OSError:
        return None  # the folder went away: no one to share with that we can see
    return 1 / holders if holders > 1 else None
