"""The offline sweep's journal file: found damaged before anything is written on it, and repaired.

    python -m app sweep-repair RUNS/sweeps/NAME.journal [--dry-run]

Optuna's JournalFileBackend appends one JSON line per change under an O_EXCL lock file
(`<journal>.lock`) and replays the file on read. A host crash or a full disk mid-append leaves a
partial last line; Optuna's reader skips a partial last line, but the next append lands right after it,
turns it into a garbage line in the middle, and from then on every reader dies in a JSON error.

The rules here:
- An incomplete last line (no newline) found while holding the journal's lock is a crashed append:
  every writer appends whole lines under that lock, so nobody is still writing it, and no reader ever
  saw it (Optuna yields complete lines only). Cutting it away loses nothing; every append does that
  first (`SafeJournalBackend`), so an agent never writes behind one.
- A complete line that is not a JSON operation (disk damage, a hand edit), or a line longer than
  MAX_LINE, is real damage: nothing is written, every command refuses with one line naming the line
  and the repair command. `sweep-repair` keeps a copy of the damaged file, drops the damaged lines if
  the rest replays cleanly in Optuna, else keeps the part before the first damaged line (the trials
  recorded after it are forgotten; their W&B runs stay on disk). Stop every agent before repairing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.storages.journal._storage import JournalOperation

from app.errors import UserError
from app.sweep.optuna import snapshot

OP_CODES = frozenset(op.value for op in JournalOperation)
STALE_LOCK_S = 120  # an append holds the lock for milliseconds: a lock this old was left by a dead writer
MAX_LINE = 16 * 1024 * 1024  # one Optuna operation; far above any real one (attrs are a few KB)
TAIL_READ = 1024 * 1024  # how far back an append looks for the start of the last line


class JournalDamaged(UserError):
    pass


@dataclass
class Scan:
    operations: int = 0
    bad: list[int] = field(default_factory=list)  # 1-based numbers of damaged complete lines
    tail_at: int | None = None  # byte offset of an incomplete last line
    bad_offsets: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each damaged line


def _is_operation(line: bytes) -> bool:
    """A JSON object with one of Optuna's op codes (an int; an unknown one breaks Optuna's replay)."""
    try:
        return _operation(json.loads(line))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def _operation(op: Any) -> bool:
    return isinstance(op, dict) and type(op.get("op_code")) is int and op["op_code"] in OP_CODES


def scan(path: str | Path) -> Scan:
    """Read the journal once, line by line (each bounded by MAX_LINE), and say what is damaged."""
    s = Scan()
    with open(path, "rb") as f:
        number, offset = 0, 0
        while True:
            line = f.readline(MAX_LINE + 1)
            if not line:
                return s
            number += 1
            start, offset = offset, offset + len(line)
            if len(line) > MAX_LINE:  # an endless line: skip to its end, in bounded reads
                while line and not line.endswith(b"\n"):
                    line = f.readline(MAX_LINE)
                    offset += len(line)
                s.bad.append(number)
                s.bad_offsets.append((start, offset))
                continue
            if not line.endswith(b"\n"):
                s.tail_at = start
                return s
            if _is_operation(line):
                s.operations += 1
            else:
                s.bad.append(number)
                s.bad_offsets.append((start, offset))


def repair_hint(path: str | Path) -> str:
    return f"stop the agents and run: python -m app sweep-repair {path}"


def damage_message(path: str | Path, s: Scan) -> str:
    more = f" and {len(s.bad) - 1} more" if len(s.bad) > 1 else ""
    return (f"sweep storage {Path(path).name[:60]} is damaged at line {s.bad[0]}{more} (not an Optuna operation); "
            f"nothing was written; {repair_hint(path)}")


def clear_stale_lock(path: str | Path) -> str | None:
    """Remove `<journal>.lock` when it is older than STALE_LOCK_S (its writer died holding it); returns
    what to say, None when there was nothing stale. Optuna alone waits 30 s in silence, then removes it.

    The lock is moved aside before it is judged, so two agents clearing it at once remove it once; one
    that turns out fresh (a writer took the lock in between) is put back."""
    lock = Path(f"{path}.lock")
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return None
    if age < STALE_LOCK_S:
        return None
    aside = lock.with_name(f"{lock.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(lock, aside)
        age = time.time() - aside.stat().st_mtime
    except OSError:
        return None  # another agent cleared it first
    if age < STALE_LOCK_S:
        with contextlib.suppress(OSError):
            os.link(aside, lock)  # a live writer's: back under its name (unless yet another writer holds it)
        aside.unlink(missing_ok=True)
        return None
    aside.unlink(missing_ok=True)
    return (f"sweep storage lock {lock.name}: removed a stale lock left {age / 60:.0f} min ago by a writer that died "
            "holding it (an append holds it for milliseconds)")


class _Lock(JournalFileOpenLock):
    """Optuna's O_EXCL lock file, which first clears (and says) a lock a dead writer left behind."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._journal = str(path)

    def acquire(self) -> bool:
        note = clear_stale_lock(self._journal)
        if note:
            print(f"[offline-sweep] {note}", file=sys.stderr, flush=True)
        return super().acquire()


_lock = _Lock


@contextlib.contextmanager
def locked(path: str | Path, lock: JournalFileOpenLock | None = None):
    """Hold the journal's own lock (the O_EXCL file Optuna's writers take), as every append does."""
    lock = lock or _lock(path)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _cut_tail(path: str | Path) -> int:
    """Under the journal's lock: remove an incomplete last line. Returns the bytes removed."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        back = min(size, TAIL_READ)
        f.seek(size - back)
        chunk = f.read(back)
        cut = chunk.rfind(b"\n")
        keep = size - back + cut + 1 if cut >= 0 else (0 if back == size else None)
        if keep is None:
            raise JournalDamaged(f"sweep storage {str(path)[:80]} ends in a line over {TAIL_READ} bytes; "
                                 f"{repair_hint(path)}")
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def _last_line(path: str | Path) -> tuple[bytes | None, int | None]:
    """(the last complete line: b"" if none, None if it starts before the last TAIL_READ bytes; an incomplete one's offset)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - min(size, TAIL_READ))
        chunk = f.read()
    base, end = size - len(chunk), chunk.rfind(b"\n") + 1  # end: just after the last newline; 0: none
    tail_at = base + end if end < len(chunk) else None
    start = chunk.rfind(b"\n", 0, max(end - 1, 0)) + 1
    if base and (end == 0 or start == 0):  # the line (or the incomplete one) starts before the chunk
        return None, (tail_at if end else None)
    return chunk[start:end], tail_at


def check(path: str | Path, heal: bool) -> str | None:
    """Refuse a damaged journal before anything writes on it; with `heal`, cut a crashed append away (under
    the lock). Returns a note to print when something was cut. Only the last line is looked at: every caller
    replays the journal next, through SafeJournalBackend.read_logs, which refuses a damaged line before the
    first write but skips an undecodable last one (as Optuna's reader does: it may be being written)."""
    last, tail_at = _last_line(path)
    if last is None or len(last) > MAX_LINE or (last and not _is_operation(last)):
        s = scan(path)  # damage, or a last line too long to judge from the tail: the whole file, for the message
        if s.bad:
            raise JournalDamaged(damage_message(path, s))
        tail_at = s.tail_at
    if tail_at is None or not heal:
        return None  # readers skip an incomplete last line: a read-only look needs no repair
    with locked(path):
        removed = _cut_tail(path)
    return (f"sweep storage {path}: removed an incomplete last line ({removed} bytes, an append cut short by "
            "a crash; no reader had seen it)") if removed else None


class SafeJournalBackend(JournalFileBackend):
    """Optuna's journal file, which never appends behind a crashed partial line and turns a damaged
    line met while reading into one error line instead of a JSON traceback."""

    def __init__(self, file_path: str):
        super().__init__(file_path, lock_obj=_lock(file_path))
        self._resume = (0, 0)  # (lines, bytes) read so far: where the next read starts

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        """Optuna's reader, the same lines in the same cases (whole lines within the size it began at; an undecodable
        last line skipped, one followed by more refused), resuming where the last read ended (not every line's
        offset kept) and refusing a line that is no operation: the damage check is the parse each line gets anyway."""
        number, offset = self._resume if self._resume[0] <= log_number_from else (0, 0)
        try:
            with open(self._file_path, "rb") as f:
                left, undecodable = os.fstat(f.fileno()).st_size - offset, None
                f.seek(offset)
                for line in f:
                    left -= len(line)
                    if left < 0 or not line.endswith(b"\n"):
                        return  # being appended now, or a crashed append's remains: not a line yet
                    if undecodable is not None:
                        raise undecodable
                    log = None  # a line read before (log_number_from) is only counted
                    if number >= log_number_from:
                        try:
                            log = json.loads(line)
                        except ValueError as exc:  # the last line may still be written in a moment: see the next
                            undecodable = exc
                            continue
                        if len(line) > MAX_LINE or not _operation(log):
                            raise ValueError("not an Optuna operation")
                    number, offset = self._resume = (number + 1, offset + len(line))
                    if log is not None:
                        yield log
        except ValueError:  # a line that is no JSON, or no operation
            s = scan(self._file_path)
            raise JournalDamaged(damage_message(self._file_path, s) if s.bad else
                                 f"sweep storage {self._file_path} changed under this agent; "
                                 f"{repair_hint(self._file_path)}") from None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        what = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        with locked(self._file_path, self._lock):
            _cut_tail(self._file_path)  # a crashed append's remains: nobody else holds the lock, so it is dead
            with open(self._file_path, "ab") as f:
                f.write(what)
                f.flush()
                os.fsync(f.fileno())


def _replays(path: Path) -> bool:
    """Whether Optuna replays the journal without an error (every study, every trial)."""
    import optuna

    try:
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=_lock(path)))
        for study in storage.get_all_studies():
            storage.get_all_trials(study._study_id, deepcopy=False)
    except Exception:  # any replay failure means this candidate is not a consistent journal
        return False
    return True


def repair(path: Path, dry_run: bool = False) -> str:
    if not path.is_file():
        raise UserError(f"no sweep journal at {str(path)[:120]!r}")
    with locked(path):
        s = scan(path)
        if not s.bad and s.tail_at is None:
            return f"{path}: intact ({s.operations} operations); nothing to repair"
        if not s.operations:  # a YAML, a log, a binary: "repairing" it would empty it
            raise UserError(f"{str(path)[:120]} is not a sweep journal (no line is an Optuna operation); "
                            "nothing changed: name the sweep's .journal file")
        blob_size = path.stat().st_size
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            dropped = Path(tmp) / "dropped.journal"
            prefix = Path(tmp) / "prefix.journal"
            end = s.tail_at if s.tail_at is not None else blob_size
            first_bad = s.bad_offsets[0][0] if s.bad_offsets else end
            with open(path, "rb") as src, open(dropped, "wb") as a, open(prefix, "wb") as b:
                pos = 0
                for start, stop in [*s.bad_offsets, (end, end)]:
                    src.seek(pos)
                    shutil.copyfileobj(_Limited(src, start - pos), a)
                    pos = stop
                src.seek(0)
                shutil.copyfileobj(_Limited(src, first_bad), b)
            if _replays(dropped):
                chosen, how = dropped, f"dropped {len(s.bad)} damaged line(s) ({', '.join(map(str, s.bad[:5]))})"
            elif _replays(prefix):
                chosen, how = prefix, f"kept the {s.bad[0] - 1} line(s) before the first damaged line {s.bad[0]}"
            else:
                raise UserError(f"{path}: no consistent journal could be recovered; start the sweep under a new name")
            if s.tail_at is not None:
                how += "; removed an incomplete last line"
            if dry_run:
                return f"{path}: would repair: {how}"
            backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            shutil.copy2(path, backup)
            with open(chosen, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(chosen, path)
            snapshot.path_of(path).unlink(missing_ok=True)  # it stands for the old bytes: no reader would use it
    return f"{path}: repaired: {how}; the damaged file is kept as {backup.name}"


class _Limited:
    """A file-like view of the next `n` bytes of `f`, for copyfileobj."""

    def __init__(self, f, n: int):
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app sweep-repair",
                                     description="Repair an offline sweep's journal file damaged by a crash or a full "
                                                 "disk (stop every agent of that sweep first). The damaged file is kept.")
    parser.add_argument("journal", help="the journal file, e.g. runs/sweeps/grid.journal")
    parser.add_argument("--dry-run", action="store_true", help="say what would be repaired; change nothing")
    args = parser.parse_args(argv)
    print(repair(Path(args.journal), dry_run=args.dry_run))
    return 0
