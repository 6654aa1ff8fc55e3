"""Read what an offline W&B run recorded, straight from its `run-<id>.wandb` transaction log.

Offline runs don't write config.yaml or wandb-summary.json; the log is the record of truth and what
`wandb sync` uploads. Its framing is LevelDB's log format (32 KiB blocks of checksummed chunks) after
a 7-byte W&B header; each record is a `wandb_internal_pb2.Record` protobuf.

A log may come from another host and may be damaged (a full disk, a bad copy): it is read one block
at a time, a record is bounded by MAX_RECORD, and damaged parts are skipped and listed in
`OfflineRun.damaged` instead of stopping the reader. A 0-byte log is `empty`, not an error.
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


MAX_RECORD = 64 * 1024 * 1024  # one record (a config, a history row); W&B's own limits are far below
MAX_DAMAGE_NOTES = 5  # what a damaged log reports about itself; the count goes on


class RunLogError(ValueError):
    pass


class Damage(list):
    """Where a log is damaged, as short notes (at most MAX_DAMAGE_NOTES; `count` has them all)."""

    count = 0

    def note(self, text: str) -> None:
        self.count += 1
        if len(self) < MAX_DAMAGE_NOTES:
            self.append(text)


def _chunks(f, damage: Damage) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each whole, checksummed chunk, reading one 32 KiB block at a time. A damaged
    chunk is noted and the rest of its block skipped (its lengths can't be trusted), as LevelDB does."""
    block_no = 0
    while True:
        block = f.read(BLOCK)
        if not block:
            return
        pos = len(HEADER) + 1 if block_no == 0 else 0
        while pos + CHUNK_HEADER <= len(block):
            crc, length, kind = struct.unpack("<IHB", block[pos:pos + CHUNK_HEADER])
            if kind == 0 and length == 0:  # zero padding / the unwritten end of a live run
                break
            payload = block[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
            if len(payload) < length:
                if len(block) < BLOCK:
                    return  # a run still being written (or killed mid-write): stop at the last whole chunk
                damage.note(f"chunk longer than its block at byte {block_no * BLOCK + pos}")
                break
            if kind not in (FULL, FIRST, MIDDLE, LAST) or zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
                damage.note(f"checksum mismatch at byte {block_no * BLOCK + pos}")
                break
            yield kind, payload
            pos += CHUNK_HEADER + length
        block_no += 1


def records(path: str | Path, damage: Damage | None = None):
    """Yield each protobuf Record of a `.wandb` file, in order. Damaged parts are skipped and noted in
    `damage` (a record cut by damage is dropped whole); only a file that is not a run log raises."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    damage = Damage() if damage is None else damage
    with open(path, "rb") as f:
        head = f.read(len(HEADER) + 1)
        if len(head) < len(HEADER) + 1 or not head.startswith(HEADER):
            raise RunLogError(f"{path} is not a W&B run log" if head else f"{path} is empty (0 bytes)")
        f.seek(0)
        parts: list[bytes] | None = None
        size = 0
        for kind, payload in _chunks(f, damage):
            if kind in (FULL, FIRST):
                if parts is not None:
                    damage.note("a record with no end")
                parts, size = [payload], len(payload)
                if kind == FIRST:
                    continue
            elif parts is None:
                damage.note("a record with no start")
                continue
            else:
                parts.append(payload)
                size += len(payload)
                if size > MAX_RECORD:
                    damage.note(f"a record over {MAX_RECORD >> 20} MiB")
                    parts = None
                    continue
                if kind == MIDDLE:
                    continue
            record = pb.Record()
            try:
                record.ParseFromString(b"".join(parts))
            except DecodeError:
                damage.note("a record that does not decode")
                continue
            finally:
                parts = None
            yield record


@dataclass
class OfflineRun:
    path: Path  # the offline-run-* folder
    run_id: str = ""
    project: str = ""
    group: str = ""
    sweep_id: str = ""
    name: str = ""  # its display name: an offline sweep's trial is "<sweep>-<trial number>"
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None  # None: the run never finished (killed, or still running)
    runtime: float | None = None  # seconds it ran, as W&B counts them (its exit record); None: never finished
    preempting: bool = False
    damaged: list[str] = field(default_factory=list)  # where the log is damaged (skipped); empty: intact
    empty: bool = False  # a 0-byte log: W&B had not written anything yet (a run just starting, or stopped then)

    @property
    def finished(self) -> bool:
        return self.exit_code is not None

    def metric(self, key: str) -> list[tuple[int, Any]]:
        """(step, value) pairs of one history key."""
        return [(row.get("_step", i), row[key]) for i, row in enumerate(self.history) if key in row]


def _items(items, damage: Damage) -> dict[str, Any]:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        try:
            out[key] = json.loads(item.value_json)
        except ValueError:
            damage.note(f"value of {key[:40]!r} is not JSON")
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
    if logs[0].stat().st_size == 0:
        run.empty = True
        return run
    damage = Damage()
    for rec in records(logs[0], damage):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.group, run.sweep_id = r.run_id, r.project, r.run_group, r.sweep_id
            run.name = r.display_name
            run.config.update({k: _config_value(v) for k, v in _items(r.config.update, damage).items()})
        elif kind == "config":
            run.config.update({k: _config_value(v) for k, v in _items(rec.config.update, damage).items()})
            for item in rec.config.remove:
                run.config.pop(item.key, None)
        elif kind == "history":
            run.history.append(_items(rec.history.item, damage))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update, damage))
        elif kind == "exit":
            run.exit_code, run.runtime = rec.exit.exit_code, float(rec.exit.runtime)
        elif kind == "preempting":
            run.preempting = True
    run.config = {k: v for k, v in run.config.items() if not k.startswith("_")}
    run.damaged = list(damage) + ([f"... {damage.count - len(damage)} more"] if damage.count > len(damage) else [])
    return run


def find(root: str | Path) -> list[Path]:
    """Every offline-run-* folder under `root` (a WANDB_DIR, its wandb/ folder, or one run)."""
    root = Path(root)
    if list(root.glob("run-*.wandb")):
        return [root]
    return sorted({p.parent for p in root.glob("**/offline-run-*/run-*.wandb")})
