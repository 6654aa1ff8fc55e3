"""Everything W&B: which mode to run in, the one `wandb.init` per run, and saving files into the run.

W&B is imported here and nowhere else in the training path, so the rest of the package can be used
(and tested) without it.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import secrets
import shlex
import shutil
import string
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

from app.config import Config, merge
from app.errors import UserError

MODES = ("online", "offline", "disabled")
DEFAULT_PROJECT = "pytorch-mnist"


def has_api_key(environ: Mapping[str, str]) -> bool:
    """A key in WANDB_API_KEY, or one that `wandb login` stored in ~/.netrc for the W&B host."""
    if environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    path = environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(environ: Mapping[str, str]) -> str:
    """WANDB_MODE if set and valid; otherwise online with an API key and offline without one."""
    mode = environ.get("WANDB_MODE", "").strip().lower()
    if mode == "dryrun":  # W&B's old name for offline
        mode = "offline"
    if mode and mode not in MODES:
        raise UserError(f"WANDB_MODE={mode!r} must be one of: {', '.join(MODES)}")
    if not mode:
        return "online" if has_api_key(environ) else "offline"
    if mode == "online" and not has_api_key(environ):
        raise UserError("WANDB_MODE=online needs an API key: set WANDB_API_KEY (or run `wandb login`), or use WANDB_MODE=offline")
    return mode


def runs_root(environ: Mapping[str, str]) -> Path:
    """Where W&B writes its `wandb/` folder of runs: WANDB_DIR, else the working directory."""
    return Path(environ.get("WANDB_DIR") or ".")


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables (W&B reads several itself: WANDB_RUN_GROUP, WANDB_TAGS...) for one
    run, then restore what was there."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_writable(path: Path, setting: str) -> None:
    """W&B silently falls back to a temp folder when WANDB_DIR is unwritable, and the run is lost."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{setting}={str(path)!r} is not writable ({exc.strerror or exc}); mount or choose a writable folder") from None


def new_run_id() -> str:
    """8 characters from W&B's run-id alphabet."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start(config: Config, environ: Mapping[str, str] | None = None, **init_kwargs: Any):
    """`wandb.init` once for this process; returns the run and the config with a sweep's values applied.

    Under `wandb agent` the sweep's parameters arrive both as --key=value arguments and in
    `run.config`; W&B keeps the sweep's values over ours, so reading `run.config` back gives the
    last layer of precedence. Keys the sweep sets that the config doesn't know are an error.
    """
    environ = os.environ if environ is None else environ
    mode = resolve_mode(environ)
    root = runs_root(environ)
    check_writable(root, "WANDB_DIR")

    import wandb

    # our own id up front: the output folder and checkpoint are keyed by it before W&B starts
    run_id = environ.get("WANDB_RUN_ID") or new_run_id()
    run = wandb.init(
        project=environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        dir=str(root),
        mode=mode,
        id=run_id,
        resume="allow",  # a requeued sweep run (same id) continues instead of failing
        config=config.to_dict(),
        **init_kwargs,
    )
    try:
        effective = merge(config, {k: v for k, v in dict(run.config).items() if not k.startswith("_")}, source="W&B sweep")
    except UserError:
        run.finish(exit_code=2)  # the run exists by now: record the failure, not a clean finish at exit
        raise
    if effective != config:
        run.config.update(effective.to_dict(), allow_val_change=True)
    return run, effective


def watch(run, model, criterion, config: Config, log_freq: int | None = None) -> None:
    if config.watch_log != "none":
        run.watch(model, criterion, log=config.watch_log, log_freq=log_freq or config.watch_log_freq)


def save_file(run, path: Path) -> Path:
    """Copy a file into the run's folder and upload it with the run.

    `run.save` on a file outside the run folder leaves a symlink to it, which breaks when the runs
    folder is copied to another host or synced from outside the container; a copy stays valid.
    """
    if run.disabled:
        return path
    target = Path(run.dir) / path.name
    shutil.copyfile(path, target)
    run.save(str(target), base_path=run.dir, policy="now")
    return target


def offline_hint(run) -> str:
    """Where an offline run is and the exact command that uploads it."""
    folder = Path(run.dir).parent
    return f"W&B offline run saved in {folder}\n  upload it with: wandb sync {shlex.quote(str(folder))}"


def log_hint(run, stream=sys.stderr) -> None:
    if run.settings.mode == "offline" or getattr(run.settings, "_offline", False):
        print(offline_hint(run), file=stream)


def materialize_links(folder: Path) -> int:
    """Replace symlinks inside a run folder by copies of what they point to (or drop dangling ones).

    wandb-core links logs/debug-core.log to its cache folder (~/.cache/wandb inside a container);
    such a link is dead once the runs folder is copied to another host. Returns links replaced.
    """
    replaced = 0
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_symlink():
            continue
        target = path.resolve()
        path.unlink()
        if target.is_file():
            shutil.copyfile(target, path)
        replaced += 1
    return replaced
