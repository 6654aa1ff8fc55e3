"""Upload offline W&B runs: `python -m app sync [PATH] [--dry-run] [--project P] [--entity E]`.

Finds every offline run under PATH (default: $WANDB_DIR, else runs), skips the ones
already uploaded and the ones still being written, and uploads the rest with the real `wandb sync`.
`wandb sync` marks each uploaded log with a `run-<id>.wandb.synced` file beside it (wandb 0.31,
wandb/cli/beta_sync.py `_is_synced`); that marker is the only record of what is done, so running this
again after an interruption uploads exactly what is left. Exit status 1 when any upload failed.

W&B unreachable (a wrong WANDB_BASE_URL, no network): `wandb sync` retries for a long time in silence.
Each batch is given SYNC_TIMEOUT_S (or --timeout) seconds per run in it, default 120; past that the
upload is stopped, one `error:` line names the server it was waiting for, and the exit status is 2.
What finished before is marked synced and is not uploaded again.

A damaged log (a bad copy, a full disk) is still uploaded (`wandb sync` sends what it can read) and
the listing says where it is damaged; a file that is not a W&B log is skipped; a 0-byte log is empty.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from app import artifact, runlog, settings, tracking
from app.errors import UserError

QUIET_S = 120  # a run with no exit record whose log changed this recently is probably still training
BATCH = 20  # runs per `wandb sync` call: one service start per batch, progress kept per batch
TIMEOUT_S = settings.setting("SYNC_TIMEOUT_S").default  # seconds per run before an upload is given up


@dataclass
class OfflineRunFile:
    folder: Path  # offline-run-*/
    log: Path  # run-<id>.wandb
    finished: bool  # the log has an exit record
    age_s: float  # seconds since the log last changed
    empty: bool = False  # no run record: W&B had written nothing (0 bytes, or only a header); nothing to upload
    damaged: list[str] = field(default_factory=list)  # where the log is damaged (wandb sync uploads the rest)
    not_a_log: str = ""  # why the file is not a W&B run log: skipped

    @property
    def synced(self) -> bool:
        return self.log.with_suffix(".wandb.synced").exists()

    @property
    def live(self) -> bool:
        return not self.finished and self.age_s < QUIET_S


def scan(root: Path) -> list[OfflineRunFile]:
    now = time.time()
    found = []
    for folder in runlog.find(root):
        if not folder.name.startswith("offline-run-"):
            continue  # online runs were uploaded as they ran
        log = sorted(folder.glob("run-*.wandb"))[0]
        damage = runlog.Damage()
        not_a_log = ""
        try:
            age = now - log.stat().st_mtime
            kinds = {r.WhichOneof("record_type") for r in runlog.records(log, damage)}
        except runlog.RunLogError as exc:
            kinds = set()
            not_a_log = "" if "(0 bytes)" in str(exc) else str(exc)
        except OSError as exc:  # unreadable (permissions) or gone since the listing
            kinds, age, not_a_log = set(), 0.0, f"cannot read {log.name} ({exc.strerror or exc})"
        damaged = list(damage) + ([f"... {damage.count - len(damage)} more"] if damage.count > len(damage) else [])
        found.append(OfflineRunFile(folder, log, "exit" in kinds, age, empty="run" not in kinds and not not_a_log,
                                    damaged=damaged, not_a_log=not_a_log))
    return found


def wandb_command(folders: list[Path], project: str | None, entity: str | None) -> list[str]:
    cli = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    cmd = [cli, "sync", "--no-include-online", "--no-include-synced"]
    if project:
        cmd += ["--project", project]
    if entity:
        cmd += ["--entity", entity]
    return cmd + [str(f.absolute()) for f in folders]  # absolute: each batch runs from its own folder


def _upload(cmd: list[str], environ: Mapping[str, str], cwd: Path, timeout_s: float) -> tuple[int, str]:
    """Run `wandb sync`; on timeout stop it and everything it started (its service) and raise."""
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, env=dict(environ), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own group: a timeout ends its service too
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            url = settings.get("WANDB_BASE_URL", environ)
            raise UserError(f"no answer from W&B at {url[:80]} within {timeout_s:.0f} s (SYNC_TIMEOUT_S or --timeout); "
                            "check WANDB_BASE_URL and the network; runs uploaded so far are marked synced") from None
        except BaseException:
            _stop_group(proc)
            raise
        log.seek(0)
        return code, log.read()[-20000:]


def _stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def sync(root: Path, *, dry_run: bool, project: str | None, entity: str | None, environ: Mapping[str, str],
         include_unfinished: bool = False, out=sys.stdout, timeout_s: float = TIMEOUT_S) -> dict[str, int]:
    """`timeout_s`: seconds per run in a batch before an upload is given up (UserError)."""
    runs = scan(root)
    already = [r for r in runs if r.synced]
    live = [r for r in runs if not r.synced and r.live and not include_unfinished]
    foreign = [r for r in runs if not r.synced and r.not_a_log]
    empty = [r for r in runs if not r.synced and r not in live and r.empty]
    todo = [r for r in runs if not r.synced and r not in live and r not in empty and r not in foreign]
    print(f"found {len(runs)} offline run(s) under {root}: {len(already)} already synced, "
          f"{len(live)} still being written, {len(empty)} empty, {len(foreign)} unreadable, {len(todo)} to upload",
          file=out)
    for r in empty:
        print(f"  skipped (empty: W&B wrote no run record into this log, nothing to upload): {r.folder}", file=out)
    for r in foreign:
        print(f"  skipped ({r.not_a_log}): {r.folder}", file=out)
    for r in live:
        print(f"  skipped (no exit record, written {r.age_s:.0f} s ago; sync again when it ends, or pass "
              f"--include-unfinished if it was killed and only copied here recently): {r.folder}", file=out)
    for r in todo:
        note = "" if r.finished else "  (no exit record: the run was killed; uploads as crashed)"
        if r.damaged:
            note += f"  (damaged: {'; '.join(r.damaged)}; the readable records upload)"
        print(f"  {'would upload' if dry_run else 'upload'}: {r.folder}{note}", file=out)
    counts = {"found": len(runs), "already_synced": len(already), "live": len(live), "empty": len(empty),
              "uploaded": 0, "failed": 0}
    if dry_run or not todo:
        if dry_run and todo:
            print("would run: " + " ".join(wandb_command([r.folder for r in todo], project, entity)), file=out)
        return counts
    # a run's model artifact records its files relative to the folder that holds the run folder
    # (app.artifact): `wandb sync` runs from there, so one batch never spans two such folders
    # runs whose model claims a sweep's best-so-far alias go last, one by one, worst first: W&B gives the
    # alias to the version it commits last (app.artifact.best_claim)
    claims = {r.folder: artifact.best_claim(r.folder) for r in todo}
    plain = [r for r in todo if claims[r.folder] is None]
    batches = []
    for start in range(0, len(plain), BATCH):
        chunk = plain[start:start + BATCH]
        for parent in dict.fromkeys(r.folder.parent for r in chunk):
            batches.append([r for r in chunk if r.folder.parent == parent])
    batches += [[r] for r in sorted((r for r in todo if claims[r.folder] is not None), key=lambda r: claims[r.folder])]
    url = settings.get("WANDB_BASE_URL", environ)
    for batch in batches:
        cmd = wandb_command([r.folder for r in batch], project, entity)
        limit = timeout_s * len(batch)
        print(f"uploading {len(batch)} run(s) to {url[:80]} (giving up after {limit:.0f} s)", file=out, flush=True)
        returncode, output = _upload(cmd, environ, batch[0].folder.parent, limit)
        for r in batch:
            ok = r.synced
            counts["uploaded" if ok else "failed"] += 1
            if not ok:
                print(f"  failed: {r.folder}", file=out)
        if returncode or any(not r.synced for r in batch):
            tail = "\n".join(output.strip().splitlines()[-15:])
            print(f"wandb sync exited {returncode}; its last lines:\n{tail}", file=out)
    print(f"uploaded {counts['uploaded']}, failed {counts['failed']}, already synced {counts['already_synced']}, "
          f"still being written {counts['live']}", file=out)
    return counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app sync",
                                     description="Upload every offline W&B run under PATH that isn't uploaded yet.")
    parser.add_argument("path", nargs="?", help="runs folder (default: $WANDB_DIR, else runs)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; needs no API key")
    parser.add_argument("--project", help="upload into this W&B project instead of the one each run recorded")
    parser.add_argument("--entity", help="upload into this W&B entity (team or user)")
    parser.add_argument("--include-unfinished", action="store_true",
                        help=f"also upload runs with no exit record changed in the last {QUIET_S} s "
                             "(a copy resets file times; a killed run then looks like a live one)")
    parser.add_argument("--timeout", type=float, help=f"seconds per run before an upload is given up "
                                                      f"(default: $SYNC_TIMEOUT_S, else {TIMEOUT_S})")
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise UserError(f"--timeout={args.timeout} must be a positive number of seconds")
    timeout_s = args.timeout or settings.get("SYNC_TIMEOUT_S", environ)
    root = Path(args.path) if args.path else settings.runs_root(environ)
    if not root.exists():
        raise UserError(f"runs folder {str(root)!r} does not exist; pass the folder that holds wandb/offline-run-*")
    if not args.dry_run and not tracking.has_api_key(environ):
        raise UserError("sync uploads to W&B and needs an API key: set WANDB_API_KEY or run `wandb login` "
                        "(--dry-run lists the runs without one)")
    counts = sync(root, dry_run=args.dry_run, project=args.project, entity=args.entity, environ=environ,
                  include_unfinished=args.include_unfinished, timeout_s=timeout_s)
    return 1 if counts["failed"] else 0
