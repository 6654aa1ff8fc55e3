"""Spread sweep agents over the host's GPUs: each agent claims one slot and trains on that GPU only.

Called by the container entrypoint before it becomes `wandb agent`. Every agent sees every GPU (compose's
GPU reservation gives each replica the same devices), so the agents agree on who trains where through
lock files in a folder they all mount (GPU_SLOTS_DIR, default $WANDB_DIR/.gpu-slots):

    gpu-<key>.slot-<k>.lock  held (flock) by the agent in slot k of the GPU <key> for as long as it lives

The key names one physical GPU wherever the folder is mounted: its UUID when known (nvidia-smi, or
NVIDIA_VISIBLE_DEVICES=GPU-<uuid> as the Kubernetes device plugin sets it), else <host id>-<index>
(GPU_HOST_ID, else /etc/machine-id, else the hostname outside a container). So agents on two hosts
sharing one runs folder never count each other's GPU 0 as their own.

When a scheduler already chose the GPU (Slurm's GRES sets CUDA_VISIBLE_DEVICES), nothing is claimed:
the agent trains on what it was given.

A new agent takes the GPU with the fewest live holders (4 agents on 2 GPUs -> 2 each). The lock is
taken on a file descriptor that the entrypoint's `wandb agent` child inherits, so it is held exactly as long
as the agent: the kernel drops it when the agent exits, crashes or its container is killed, and the
next agent to start takes the free slot. No stale state to clean up, no PIDs compared across containers.

With GPUS_PER_TRIAL=N > 1 a slot is a group of N whole GPUs (GPUs 0..N-1, N..2N-1, ...): the agent
holds slot 0 of each GPU of the first group that nobody holds any of, and its trials' N ranks use them
(8 GPUs, N=2: 4 agents, disjoint). N must divide the GPUs the agent sees; when no group is free, or a
scheduler's CUDA_VISIBLE_DEVICES names fewer than N, the agent refuses to start in one line.

Settings (environment):
  GPUS_PER_TRIAL        GPUs one trial trains on (app.ranks); > 1: each agent holds a group of that many
  GPU_SLOTS_DIR         shared folder for the slot locks (default $WANDB_DIR/.gpu-slots)
  AGENTS_PER_GPU        agents that will share one GPU: caps the slots and fixes each agent's memory
                        share at 1/AGENTS_PER_GPU from the start (unset: each run, when it starts, takes
                        1/(agents holding a slot on its GPU then): see run_share)
  CUDA_VISIBLE_DEVICES  set by hand or by the scheduler: no slot is claimed, the agent uses what it names
  GPU_COUNT             use GPUs 0..N-1 without looking for devices (also: fake devices for tests)
  GPU_HOST_ID           this host's name in slot keys when the GPUs have no UUID (default: machine id)
  NVIDIA_VISIBLE_DEVICES a list such as 0,1 or GPU-<uuid>: the host's ids of the container's GPUs, so
                        agents pinned to different GPUs (python -m app launch) never share a slot file
Exports: CUDA_VISIBLE_DEVICES (the chosen GPU), GPU_MEMORY_FRACTION (1/AGENTS_PER_GPU when that is set
and the user chose no fraction), GPU_SLOT (gpu-<key>.slot-<k>), GPU_SLOTS_DIR (where the slots are, for
run_share), AGENT_INDEX (how many agents held slots when this one started: 0 for the first, used to
stagger starts).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from app import settings
from app.gpu_share import is_held, slots_dir
from app.errors import UserError

DEV_GLOB = "/dev/nvidia[0-9]*"
MACHINE_ID = Path("/etc/machine-id")
UUID = re.compile(r"(GPU|MIG)-[0-9A-Fa-f-]+(/\d+/\d+)?")
_held: list[int] = []  # this process's slot lock fds: kept open (and inherited by the agent child) on purpose


@dataclass(frozen=True)
class Slot:
    ordinal: int  # the CUDA index inside this container
    gpu: str  # the host's id of that GPU: the key the agents share
    index: int  # slot number on that GPU
    holders: int  # agents on that GPU, this one included
    agent_index: int  # agents holding a slot anywhere before this one claimed
    fd: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem


def smi_gpus() -> list[str]:
    """One entry per GPU `nvidia-smi -L` lists, in CUDA order: its UUID, or "" when the line shows none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    lines = [line for line in out.splitlines() if line.startswith("GPU ")]
    return [m.group(0) if (m := re.search(r"GPU-[0-9A-Fa-f-]+", line)) else "" for line in lines]


def smi_count() -> int:
    """GPUs `nvidia-smi -L` lists (0 without a driver)."""
    return len(smi_gpus())


def host_id(environ: Mapping[str, str], machine_id: Path = MACHINE_ID) -> str:
    """This host's name in slot keys: GPU_HOST_ID, the machine id, or the hostname ("" in a container
    without a machine id: its hostname is the container's, and containers on one host must agree)."""
    chosen = settings.get("GPU_HOST_ID", environ)
    if chosen:
        return chosen
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = machine_id.read_text().strip()
        if text:
            return text[:12]  # 48 bits of a random 128-bit id: plenty for the hosts of one cluster
    in_container = os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
    return "" if in_container else socket.gethostname()


def gpu_ids(environ: Mapping[str, str], dev_glob: str = DEV_GLOB,
            smi: Callable[[], list[str]] = smi_gpus, machine_id: Path = MACHINE_ID) -> list[str]:
    """Keys of the GPUs this container can use, in CUDA order ([] = none): a UUID where one is known,
    else <host id>-<the host's index>, so the same key never means two GPUs on two hosts."""
    count = settings.get("GPU_COUNT", environ)
    listed_by_smi: list[str] = []
    if count is None:
        nodes = [p for p in glob.glob(dev_glob) if re.search(r"nvidia\d+$", p)]
        listed_by_smi = smi()
        count = len(nodes) or len(listed_by_smi)
    if not count:
        return []
    visible = settings.get("NVIDIA_VISIBLE_DEVICES", environ) or ""
    listed = [v.strip() for v in visible.split(",") if v.strip()]
    if not (listed and visible.lower() not in ("all", "none", "void") and len(listed) == count):
        listed = [str(i) for i in range(count)]
    if all(UUID.fullmatch(g) for g in listed):
        return listed  # the device plugin's or the launcher's UUIDs: unique on every host
    if len(listed_by_smi) == count and all(listed_by_smi):
        return listed_by_smi  # the driver's UUIDs, the same whichever container or host asks
    host = host_id(environ, machine_id)
    return [f"{host}-{g}" if host else g for g in listed]


def _agents_per_gpu(environ: Mapping[str, str]) -> int | None:
    return settings.get("AGENTS_PER_GPU", environ)


def _safe(gpu: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", gpu)


def _slot_indexes(folder: Path, gpu: str) -> list[int]:
    pattern = re.compile(rf"^gpu-{re.escape(_safe(gpu))}\.slot-(\d+)\.lock$")
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name)))


def _open_shared(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # no-op unless we created it: umask would leave it unopenable for others
    return fd


@contextlib.contextmanager
def _mutex(folder: Path) -> Iterator[None]:
    """Serialises claims across every container that mounts the folder (blocking, held for milliseconds)."""
    fd = _open_shared(folder / "assign.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim(gpus: list[str], folder: Path, per_gpu: int | None = None) -> Slot:
    """Take a slot on the GPU with the fewest live holders (ties: the lowest CUDA index)."""
    try:
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                folder.chmod(0o1777)  # agents running as another user still create their slot files
        with _mutex(folder):
            held = {g: [i for i in _slot_indexes(folder, g) if is_held(folder / f"gpu-{_safe(g)}.slot-{i}.lock")]
                    for g in gpus}
            ordinal = min(range(len(gpus)), key=lambda o: (len(held[gpus[o]]), o))
            gpu = gpus[ordinal]
            if per_gpu is not None and len(held[gpu]) >= per_gpu:
                raise UserError(f"all {per_gpu * len(gpus)} GPU slots are taken ({len(gpus)} GPU(s) x AGENTS_PER_GPU={per_gpu}): "
                                "stop an agent or raise AGENTS_PER_GPU")
            index = next(i for i in range(len(held[gpu]) + 1) if i not in held[gpu])
            path = folder / f"gpu-{_safe(gpu)}.slot-{index}.lock"
            fd = _open_shared(path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: we hold the mutex and found it unheld
            os.set_inheritable(fd, True)  # also held by the `wandb agent` child
            return Slot(ordinal, gpu, index, len(held[gpu]) + 1, sum(len(v) for v in held.values()), fd, path)
    except OSError as exc:
        raise UserError(f"GPU_SLOTS_DIR={str(folder)!r} is not usable for GPU slot locks ({exc.strerror or exc}); "
                        "mount a shared writable folder there") from None


def _groups(n: int, count: int, where: str) -> int:
    """How many groups of GPUS_PER_TRIAL=n GPUs `count` GPUs make; one line when they make none exactly."""
    if count < n or count % n:
        raise UserError(f"GPUS_PER_TRIAL={n} must divide the {count} GPU(s) this agent sees ({where}): "
                        f"give it a multiple of {n} GPUs or change GPUS_PER_TRIAL")
    return count // n


def claim_group(gpus: list[str], folder: Path, n: int) -> list[Slot]:
    """Slot 0 of every GPU of the first group of `n` that no agent holds any slot of."""
    _groups(n, len(gpus), "GPU_COUNT or the devices found")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _mutex(folder):
            busy = {g for g in gpus if any(is_held(folder / f"gpu-{_safe(g)}.slot-{i}.lock") for i in _slot_indexes(folder, g))}
            starts = [o for o in range(0, len(gpus), n) if not busy & set(gpus[o:o + n])]
            if not starts:
                raise UserError(f"all {len(gpus) // n} groups of GPUS_PER_TRIAL={n} GPUs are taken ({len(gpus)} GPUs): "
                                "stop an agent or lower GPUS_PER_TRIAL")
            slots = []
            for o in range(starts[0], starts[0] + n):
                path = folder / f"gpu-{_safe(gpus[o])}.slot-0.lock"
                fd = _open_shared(path)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: we hold the mutex and found it unheld
                os.set_inheritable(fd, True)
                slots.append(Slot(o, gpus[o], 0, 1, starts[0] // n, fd, path))
            return slots
    except OSError as exc:
        raise UserError(f"GPU_SLOTS_DIR={str(folder)!r} is not usable for GPU slot locks ({exc.strerror or exc}); "
                        "mount a shared writable folder there") from None


def _assign_group(environ: dict[str, str], gpus: list[str], n: int) -> dict[str, str]:
    folder = slots_dir(environ)
    slots = claim_group(gpus, folder, n)
    _held.extend(slot.fd for slot in slots)
    visible = ",".join(str(slot.ordinal) for slot in slots)
    environ["CUDA_VISIBLE_DEVICES"] = visible
    environ["GPU_SLOTS_DIR"] = str(folder.resolve())
    environ["AGENT_INDEX"] = str(slots[0].ordinal // n)
    print(f"gpu slot: GPUs {', '.join(slot.gpu for slot in slots)} (CUDA_VISIBLE_DEVICES={visible}), "
          f"group {slots[0].ordinal // n} of GPUS_PER_TRIAL={n}, whole GPUs", file=sys.stderr, flush=True)
    return environ


def _explicit_fraction(environ: Mapping[str, str]) -> bool:
    """A share the user chose; 0 (the default, also in .env.example) means none was chosen. Read as the
    run's config reads it (a bad value is that key's one error line)."""
    return settings.get("GPU_MEMORY_FRACTION", environ) > 0


def check(environ: Mapping[str, str]) -> None:
    """The slot settings, before an agent opens its sweep's storage (an offline sweep's first agent
    creates the journal, which fixes the sweep): a mistake is one line, and nothing is created here.
    GPU_COUNT and AGENTS_PER_GPU are checked whatever the host has; GPU_SLOTS_DIR where it will be used."""
    n = settings.get("GPUS_PER_TRIAL", environ)
    if settings.is_set("CUDA_VISIBLE_DEVICES", environ):
        if n > 1:  # a scheduler's choice (Slurm's --gres=gpu:N): the trial's ranks need N of them
            _groups(n, len(settings.text("CUDA_VISIBLE_DEVICES", environ).split(",")), "CUDA_VISIBLE_DEVICES")
        return  # nothing will be claimed
    count = settings.get("GPU_COUNT", environ)
    _agents_per_gpu(environ)
    if n > 1 and count:
        _groups(n, count, "GPU_COUNT")
    if count == 0 or (count is None and not settings.is_set("GPU_SLOTS_DIR", environ)):
        return  # no GPUs named and no folder chosen: assign() finds the devices, the default folder is WANDB_DIR's
    folder = slots_dir(environ)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor))
    problem = ("is not a folder" if existing == folder and not folder.is_dir()
               else f"cannot be made: {existing} is not a folder" if not existing.is_dir()
               else f"is not writable here ({existing} is not)" if not os.access(existing, os.W_OK | os.X_OK)
               else None)
    if problem:
        raise UserError(f"GPU_SLOTS_DIR={str(folder)!r} {problem}; mount a shared writable folder there")


EXPORTS = ("CUDA_VISIBLE_DEVICES", "GPU_SLOT", "GPU_SLOTS_DIR", "AGENT_INDEX", "GPU_MEMORY_FRACTION")  # what assign sets


def assign(environ: Mapping[str, str], gpus: list[str] | None = None) -> dict[str, str]:
    """The agent's environment with its GPU slot exported; unchanged when there is no GPU."""
    environ = dict(environ)
    if settings.is_set("CUDA_VISIBLE_DEVICES", environ):
        by = "Slurm" if settings.is_set("SLURM_JOB_ID", environ) else "hand"
        print(f"gpu slot: none claimed, CUDA_VISIBLE_DEVICES={settings.raw('CUDA_VISIBLE_DEVICES', environ)} was set by {by}",
              file=sys.stderr, flush=True)
        return environ  # the user's or the scheduler's choice wins over the shared assignment
    gpus = gpu_ids(environ) if gpus is None else gpus
    if not gpus:
        return environ  # the CPU: a trial's ranks are gloo processes
    if settings.get("GPUS_PER_TRIAL", environ) > 1:
        return _assign_group(environ, gpus, settings.get("GPUS_PER_TRIAL", environ))
    per_gpu = _agents_per_gpu(environ)
    folder = slots_dir(environ)
    slot = claim(gpus, folder, per_gpu)
    _held.append(slot.fd)
    environ["CUDA_VISIBLE_DEVICES"] = str(slot.ordinal)
    environ["GPU_SLOT"] = slot.name
    environ["GPU_SLOTS_DIR"] = str(folder.resolve())
    environ["AGENT_INDEX"] = str(slot.agent_index)
    if per_gpu and per_gpu > 1 and not _explicit_fraction(environ):
        # each run caps its allocator at this share (config key gpu_memory_fraction), so one agent's
        # run can't take the memory the others on the same GPU need
        environ["GPU_MEMORY_FRACTION"] = f"{1 / per_gpu:.4f}"
    # without AGENTS_PER_GPU the share is taken when each run starts (run_share): agents started
    # together have all claimed by then, so the first one is capped like the last
    share = settings.text("GPU_MEMORY_FRACTION", environ) if _explicit_fraction(environ) else "1/(agents on it when a run starts)"
    print(f"gpu slot: GPU {slot.gpu} (CUDA_VISIBLE_DEVICES={slot.ordinal}), slot {slot.index}, "
          f"{slot.holders} agent(s) on it now, memory share {share}", file=sys.stderr, flush=True)
    return environ


def release_all() -> None:
    """Drop this process's slots (tests; an agent simply exits)."""
    while _held:
        with contextlib.suppress(OSError):
            os.close(_held.pop())
