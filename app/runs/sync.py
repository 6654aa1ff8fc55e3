"""Upload offline W&B runs: `python -m app sync [PATH] [--dry-run] [--project P] [--entity E]`.

Finds every offline run under PATH (default: $WANDB_DIR, else the working directory), skips the ones
already uploaded and the ones still being written, and uploads the rest with the real `wandb sync`.
`wandb sync` marks each uploaded log with a `run-<id>.wandb.synced` file beside it (wandb 0.31,
wandb/cli/beta_sync.py `_is_synced`); that marker is the only record of what is done, so running this
again after an interruption uploads exactly what is left. Exit status 1 when any upload failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from app import runlog, tracking
from app.errors import UserError

QUIET_S = 120  # a run with no exit record whose log changed this recently is probably still training
BATCH = 20  # runs per `wandb sync` call: one service start per batch, progress kept per batch


@dataclass
class OfflineRunFile:
    folder: Path  # offline-run-*/
    log: Path  # run-<id>.wandb
    finished: bool  # the log has an exit record
    age_s: float  # seconds since the log last changed
    empty: bool = False  # no run record: killed before W&B wrote anything, nothing to upload

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
        try:
            kinds = {r.WhichOneof("record_type") for r in runlog.records(log)}
        except runlog.RunLogError:
            kinds = {"run"}  # damaged, but something is there: let `wandb sync` judge it
        found.append(OfflineRunFile(folder, log, "exit" in kinds, now - log.stat().st_mtime, empty="run" not in kinds))
    return found


def wandb_command(folders: list[Path], project: str | None, entity: str | None) -> list[str]:
    cli = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    cmd = [cli, "sync", "--no-include-online", "--no-include-synced"]
    if project:
        cmd += ["--project", project]
    if entity:
        cmd += ["--entity", entity]
    return cmd + [str(f.absolute()) for f in folders]  # absolute: each batch runs from its own folder


def sync(root: Path, *, dry_run: bool, project: str | None, entity: str | None, environ: Mapping[str, str],
         include_unfinished: bool = False, out=sys.stdout) -> dict[str, int]:
    runs = scan(root)
    already = [r for r in runs if r.synced]
    live = [r for r in runs if not r.synced and r.live and not include_unfinished]
    empty = [r for r in runs if not r.synced and r not in live and r.empty]
    todo = [r for r in runs if not r.synced and r not in live and r not in empty]
    print(f"found {len(runs)} offline run(s) under {root}: {len(already)} already synced, "
          f"{len(live)} still being written, {len(empty)} empty, {len(todo)} to upload", file=out)
    for r in empty:
        print(f"  skipped (empty: killed before W&B wrote anything, nothing to upload): {r.folder}", file=out)
    for r in live:
        print(f"  skipped (no exit record, written {r.age_s:.0f} s ago; sync again when it ends, or pass "
              f"--include-unfinished if it was killed and only copied here recently): {r.folder}", file=out)
    for r in todo:
        note = "" if r.finished else "  (no exit record: the run was killed; uploads as crashed)"
        print(f"  {'would upload' if dry_run else 'upload'}: {r.folder}{note}", file=out)
    counts = {"found": len(runs), "already_synced": len(already), "live": len(live), "empty": len(empty),
              "uploaded": 0, "failed": 0}
    if dry_run or not todo:
        if dry_run and todo:
            print("would run: " + " ".join(wandb_command([r.folder for r in todo], project, entity)), file=out)
        return counts
    # a run's model artifact records its files relative to the folder that holds the run folder
    # (app.artifact): `wandb sync` runs from there, so one batch never spans two such folders
    batches = []
    for start in range(0, len(todo), BATCH):
        chunk = todo[start:start + BATCH]
        for parent in dict.fromkeys(r.folder.parent for r in chunk):
            batches.append([r for r in chunk if r.folder.parent == parent])
    for batch in batches:
        cmd = wandb_command([r.folder for r in batch], project, entity)
        proc = subprocess.run(cmd, env=dict(environ), cwd=batch[0].folder.parent, stdin=subprocess.DEVNULL,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in batch:
            ok = r.synced
            counts["uploaded" if ok else "failed"] += 1
            if not ok:
                print(f"  failed: {r.folder}", file=out)
        if proc.returncode or any(not r.synced for r in batch):
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            print(f"wandb sync exited {proc.returncode}; its last lines:\n{tail}", file=out)
    print(f"uploaded {counts['uploaded']}, failed {counts['failed']}, already synced {counts['already_synced']}, "
          f"still being written {counts['live']}", file=out)
    return counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app sync",
                                     description="Upload every offline W&B run under PATH that isn't uploaded yet.")
    parser.add_argument("path", nargs="?", help="runs folder (default: $WANDB_DIR, else .)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; needs no API key")
    parser.add_argument("--project", help="upload into this W&B project instead of the one each run recorded")
    parser.add_argument("--entity", help="upload into this W&B entity (team or user)")
    parser.add_argument("--include-unfinished", action="store_true",
                        help=f"also upload runs with no exit record changed in the last {QUIET_S} s "
                             "(a copy resets file times; a killed run then looks like a live one)")
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    root = Path(args.path) if args.path else tracking.runs_root(environ)
    if not root.exists():
        raise UserError(f"runs folder {str(root)!r} does not exist; pass the folder that holds wandb/offline-run-*")
    if not args.dry_run and not tracking.has_api_key(environ):
        raise UserError("sync uploads to W&B and needs an API key: set WANDB_API_KEY or run `wandb login` "
                        "(--dry-run lists the runs without one)")
    counts = sync(root, dry_run=args.dry_run, project=args.project, entity=args.entity, environ=environ,
                  include_unfinished=args.include_unfinished)
    return 1 if counts["failed"] else 0
