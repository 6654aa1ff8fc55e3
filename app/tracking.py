"""Everything W&B: which mode to run in, the one `wandb.init` per run, and saving files into the run.

W&B is imported here and nowhere else in the training path, so the rest of the package can be used
(and tested) without it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import netrc
import os
import secrets
import shlex
import string
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

from app import interrupts, places, settings
from app.config import Config, merge
from app.errors import UserError

MODES = settings.MODES  # W&B's modes
DEFAULT_PROJECT = settings.setting("WANDB_PROJECT").default


def has_api_key(environ: Mapping[str, str]) -> bool:
    """A key in WANDB_API_KEY, or one that `wandb login` stored in ~/.netrc for the W&B host."""
    if settings.is_set("WANDB_API_KEY", environ):
        return True
    host = urlparse(settings.get("WANDB_BASE_URL", environ)).hostname or ""
    path = os.path.expanduser(settings.get("NETRC", environ))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(environ: Mapping[str, str]) -> str:
    """WANDB_MODE if set and valid; otherwise online with an API key and offline without one."""
    mode = settings.get("WANDB_MODE", environ)
    if mode == "dryrun":  # W&B's old name for offline
        mode = "offline"
    if not mode:
        return "online" if has_api_key(environ) else "offline"
    if mode == "online" and not has_api_key(environ):
        raise UserError("WANDB_MODE=online needs an API key: set WANDB_API_KEY (or run `wandb login`), or use WANDB_MODE=offline")
    return mode


def require_server(environ: Mapping[str, str], needs: str, instead: str) -> None:
    """The one refusal of a W&B mode that cannot reach the server for something that needs it (a W&B
    sweep is served and created by the server). `needs`: what is being done; `instead`: the way out."""
    mode = settings.get("WANDB_MODE", environ)
    if mode in ("offline", "dryrun", "disabled"):
        raise UserError(f"{needs} but WANDB_MODE={mode}: a W&B sweep lives on the W&B server and cannot run "
                        f"offline; unset WANDB_MODE ({instead})")


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
        places.write_test(path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"{setting}={str(path)!r}: its volume is full (No space left on device); free space there "
                            "or choose a folder on another volume") from None
        raise UserError(f"{setting}={str(path)!r} is not writable ({exc.strerror or exc}); mount or choose a writable folder") from None


@contextlib.contextmanager
def own_files(run, failing: bool) -> Iterator[None]:
    """Around `run.finish`: W&B's own log files live in the run folder, and on a volume that filled up (or
    turned read-only) under the run, closing them raises OSError. That is one line naming the folder; nothing
    when the run is `failing` already (an error of its own, or a stop: that one is said)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        if not failing:
            raise UserError(f"W&B could not write its files in the run folder {Path(run.dir).parent} "
                            f"({exc.strerror}): its record is incomplete; free space on the volume of WANDB_DIR") from None


def new_run_id() -> str:
    """8 characters from W&B's run-id alphabet."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def prepare_wandb_environ(environ: Mapping[str, str] | None = None) -> None:
    """The WANDB_* variables W&B reads from os.environ itself, as our runs need them. Before W&B loads its
    settings: in a process that runs many, W&B warns at each wandb.init once they have changed since."""
    settings.tidy_wandb()  # W&B reads os.environ itself: it rejects some empty values (WANDB_MODE=) and ` OFFLINE`
    # W&B's own end of a run is ~25 lines of history and summary (every trial, in an agent's log) and a
    # `wandb sync offline-run-...` that uploads the run without its model artifact, or names a path only the
    # container has; our lines say where the run is and how to upload it. WANDB_QUIET=false brings W&B's back.
    os.environ.setdefault("WANDB_QUIET", "true")


def start(config: Config, environ: Mapping[str, str] | None = None, mode: str | None = None,
          **init_kwargs: Any):
    """`wandb.init` once for this process; returns the run and the config with a sweep's values applied.

    `mode` is the one `resolve_mode` gave (the caller has checked the folders); None resolves it here.
    Under `wandb agent` the sweep's parameters arrive both as --key=value arguments and in
    `run.config`; W&B keeps the sweep's values over ours, so reading `run.config` back gives the
    last layer of precedence. Keys the sweep sets that the config doesn't know are an error.
    """
    environ = os.environ if environ is None else environ
    mode = mode or resolve_mode(environ)
    prepare_wandb_environ(environ)
    # W&B logs to files in the run folder: on a volume that fills up under the run each of its log calls would
    # print a traceback ("--- Logging error ---"), hundreds a run; what could not be written is said in one
    # line instead (our own writes into the run folder, and own_files above)
    logging.raiseExceptions = False

    import wandb

    _skip_launch_inputs_import()
    # our own id up front: the output folder and checkpoint are keyed by it before W&B starts
    given = settings.get("WANDB_RUN_ID", environ)
    run_id = given or new_run_id()
    ids: dict[str, Any] = {"project": settings.get("WANDB_PROJECT", environ), "id": run_id}
    if settings.is_set("WANDB_SWEEP_ID", environ) and given:
        ids = {}  # a `wandb agent` run: W&B takes id and project from the agent and warns it ignores ours
    if "symlink" in init_kwargs:  # a run setting W&B takes in `settings`
        init_kwargs["settings"] = wandb.Settings(symlink=init_kwargs.pop("symlink"))
    run = None
    try:
        with interrupts.deferred():  # a stop inside wandb.init would leave a run with no exit record
            run = wandb.init(
                dir=str(settings.runs_root(environ)),
                mode=mode,
                resume="allow",  # a requeued sweep run (same id) continues instead of failing
                config=config.to_dict(),
                **ids,
                **init_kwargs,
            )
    except interrupts.Stopped as stop:
        if run is not None:
            with interrupts.unless_wandb_lost() as recording:  # a job-wide stop may have ended W&B's service
                run.mark_preempting()  # nothing trained yet: a sweep requeues the run instead of losing its values
                run.finish(exit_code=stop.exit_code)
            stop.told = not recording.lost
        raise
    try:
        effective = merge(config, {k: v for k, v in dict(run.config).items() if not k.startswith("_")}, source="W&B sweep")
    except UserError:
        run.finish(exit_code=2)  # the run exists by now: record the failure, not a clean finish at exit
        raise
    if effective != config:
        run.config.update(effective.to_dict(), allow_val_change=True)
    return run, effective


def _skip_launch_inputs_import() -> None:
    """wandb.init ends by applying W&B Launch's staged job inputs, importing W&B's launch and public-API
    packages to look (~0.35 s of CPU, every process). Inputs can only have been staged through that very
    module (wandb.sdk.launch.inputs.internal), so while it is not imported there is nothing to apply:
    the look is skipped then, and made as before once it is."""
    from wandb.sdk import wandb_run

    apply = getattr(wandb_run.Run, "_detect_and_apply_job_inputs", None)
    if apply is None or getattr(apply, "_skips_unimported", False):
        return

    def detect_and_apply_job_inputs(self) -> None:
        if "wandb.sdk.launch.inputs.internal" in sys.modules:
            apply(self)

    detect_and_apply_job_inputs._skips_unimported = True
    wandb_run.Run._detect_and_apply_job_inputs = detect_and_apply_job_inputs


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
    places.copy_file(path, target, "the W&B run folder", "free space on the volume of WANDB_DIR, then rerun this "
                     "run id to test and export it again")
    run.save(str(target), base_path=run.dir, policy="now")
    return target


CONTAINER_MARK = "APP_IN_CONTAINER"  # set by the image's entrypoint for everything it starts


def in_container(environ: Mapping[str, str] | None = None) -> bool:
    """Started by the image's entrypoint. (Not /.dockerenv: a developer's own shell may run in a
    container where the paths printed are the right ones.)"""
    return settings.get(CONTAINER_MARK, environ)


def offline_hint(run, environ: Mapping[str, str] | None = None, container: bool | None = None) -> str:
    """Where an offline run is and the exact command that uploads it, from where it can be run.

    In a container the run's path exists only inside it: name the runs volume's folder on the host
    (RUNS_DIR_HOST, the compose setting for it, else compose's default ./runs) and what to run there."""
    folder = Path(run.dir).parent
    container = in_container(environ) if container is None else container
    if not container:
        # not plain `wandb sync FOLDER`: it uploads the run but drops its model artifact unless run from
        # the folder that holds the run (the artifact's files are recorded relative to it)
        return f"W&B offline run saved in {folder}\n  upload it with: python -m app sync {shlex.quote(str(folder))}"
    host = settings.get("RUNS_DIR_HOST", environ)
    try:
        inside = folder.relative_to(settings.runs_root(environ))
    except ValueError:
        inside = Path("wandb") / folder.name
    return (f"W&B offline run saved in the runs volume as {inside} (host folder {host})\n"
            f"  upload it on the host with: python -m app sync {shlex.quote(host)}"
            # plain `wandb sync` finds the model artifact's files only when run from the folder holding the run
            f"  (or: cd {shlex.quote(str(Path(host) / inside.parent))} && wandb sync {shlex.quote(inside.name)})")


def shutdown() -> None:
    """End this process's connection to W&B's service now, if W&B was used. A process that runs many runs
    keeps the service between them; at its end a job-wide stop (a plain `scancel`) may have ended the
    service too, and W&B's own exit handler would then print its ConnectionResetError as a traceback."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        with interrupts.unless_wandb_lost():
            wandb.teardown()


def is_offline(run) -> bool:
    return run.settings.mode == "offline" or bool(getattr(run.settings, "_offline", False))


def host_path(path: str | os.PathLike, roots: Mapping[str, Path], environ: Mapping[str, str] | None = None) -> str:
    """`path` as the user finds it: in a container, under the host folder its volume is mounted from.
    `roots`: each volume's folder inside (e.g. /outputs) by the setting naming its host folder."""
    if not in_container(environ):
        return str(path)
    for host_setting, inside in roots.items():
        try:
            return str(Path(settings.get(host_setting, environ)) / Path(path).relative_to(inside))
        except ValueError:
            continue
    return str(path)


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
        if not target.is_file():
            path.unlink()
        else:
            try:  # the copy replaces the link by rename: on a full volume the link stays, nothing half-written
                places.copy_file(target, path, "the W&B run folder", "the link is kept")
            except UserError:
                continue  # the run's own line has said the volume is full (its record is incomplete)
        replaced += 1
    return replaced
