"""Read what an offline W&B run recorded, straight from its `run-<id>.wandb` transaction log.

Offline runs don't write config.yaml or wandb-summary.json; the log is the record of truth and what
`wandb sync` uploads. Its framing is LevelDB's log format (32 KiB blocks of checksummed chunks) after
a 7-byte W&B header; each record is a `wandb_internal_pb2.Record` protobuf.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024
HEADER = b":W&B\xe1\xbe"  # magic + key; the 7th byte is the format version
CHUNK_HEADER = 7  # crc32 (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class RunLogError(ValueError):
    pass


def _chunks(blob: bytes) -> Iterator[tuple[int, bytes]]:
    pos = len(HEADER) + 1
    while pos + CHUNK_HEADER <= len(blob):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # the writer pads block tails too short for a header
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", blob[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding / the unwritten end of a live run
            pos += left_in_block
            continue
        payload = blob[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        if len(payload) < length:
            return  # a run still being written (or killed mid-write): stop at the last whole chunk
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise RunLogError(f"checksum mismatch at byte {pos}")
        yield kind, payload
        pos += CHUNK_HEADER + length


def records(path: str | Path):
    """Yield each protobuf Record of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    blob = Path(path).read_bytes()
    if not blob.startswith(HEADER):
        raise RunLogError(f"{path} is not a W&B run log")
    parts: list[bytes] = []
    for kind, payload in _chunks(blob):
        if kind == FULL:
            parts = [payload]
        elif kind == FIRST:
            parts = [payload]
            continue
        else:
            parts.append(payload)
            if kind == MIDDLE:
                continue
        record = pb.Record()
        record.ParseFromString(b"".join(parts))
        parts = []
        yield record


@dataclass
class OfflineRun:
    path: Path  # the offline-run-* folder
    run_id: str = ""
    project: str = ""
    group: str = ""
    sweep_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None  # None: the run never finished (killed, or still running)
    preempting: bool = False

    @property
    def finished(self) -> bool:
        return self.exit_code is not None

    def metric(self, key: str) -> list[tuple[int, Any]]:
        """(step, value) pairs of one history key."""
        return [(row.get("_step", i), row[key]) for i, row in enumerate(self.history) if key in row]


def _items(items) -> dict[str, Any]:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


def _config_value(v: Any) -> Any:
    # W&B stores config entries as {"value": x, "desc": ...}
    return v.get("value") if isinstance(v, dict) and "value" in v else v


def read(run_folder: str | Path) -> OfflineRun:
    folder = Path(run_folder)
    logs = sorted(folder.glob("run-*.wandb"))
    if not logs:
        raise RunLogError(f"no run-*.wandb file in {folder}")
    run = OfflineRun(path=folder)
    for rec in records(logs[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.group, run.sweep_id = r.run_id, r.project, r.run_group, r.sweep_id
            run.config.update({k: _config_value(v) for k, v in _items(r.config.update).items()})
        elif kind == "config":
            run.config.update({k: _config_value(v) for k, v in _items(rec.config.update).items()})
            for item in rec.config.remove:
                run.config.pop(item.key, None)
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
        elif kind == "preempting":
            run.preempting = True
    run.config = {k: v for k, v in run.config.items() if not k.startswith("_")}
    return run


def find(root: str | Path) -> list[Path]:
    """Every offline-run-* folder under `root` (a WANDB_DIR, its wandb/ folder, or one run)."""
    root = Path(root)
    if list(root.glob("run-*.wandb")):
        return [root]
    return sorted({p.parent for p in root.glob("**/offline-run-*/run-*.wandb")})
