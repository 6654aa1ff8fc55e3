"""The container's entrypoint: picks a single run or a `wandb agent` from the environment.

    docker run IMAGE                     -> one training run (settings from env / .env)
    docker run IMAGE --epochs=1          -> one training run with these --key=value settings
    docker run -e SWEEP_ID=e/p/id IMAGE  -> `wandb agent e/p/id` (runs `python -m app train ...`)
    docker run IMAGE bash                -> any other command runs as given

APP_MODE=run|agent overrides the choice. Every problem with the environment is found before any
work starts and reported as one line with exit code 2.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path
from typing import Mapping

from app import config, tracking
from app.errors import UserError

MODES = ("auto", "run", "agent", "offline-sweep")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise UserError(f"{name}={environ[name]!r} must be true or false")


def gpus_visible() -> bool:
    """Device nodes the NVIDIA runtime mounts for `--gpus`; no torch import needed to see them."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def choose_mode(environ: Mapping[str, str]) -> str:
    mode = environ.get("APP_MODE", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UserError(f"APP_MODE={mode!r} must be one of: {', '.join(MODES)}")
    if mode == "auto":
        if environ.get("SWEEP_ID", "").strip():
            mode = "agent"
        elif environ.get("SWEEP_CONFIG", "").strip():
            mode = "offline-sweep"
        else:
            mode = "run"
    elif mode == "agent" and not environ.get("SWEEP_ID", "").strip() and environ.get("SWEEP_CONFIG", "").strip():
        mode = "offline-sweep"  # the compose `agent` service given a sweep YAML instead of a sweep id
    return mode


def check_gpu(environ: Mapping[str, str], has_gpu: bool) -> str | None:
    """Refuse to train a GPU job on the CPU by accident; ALLOW_CPU=true makes it a warning."""
    device = environ.get("DEVICE", "auto").strip().lower()
    if device == "cpu" or has_gpu:
        return None
    if device.startswith("cuda"):
        raise UserError(f"DEVICE={device!r} but no GPU is visible in the container: run with --gpus all (or the compose GPU reservation)")
    if not flag(environ, "ALLOW_CPU"):
        raise UserError("no GPU is visible in the container: run with --gpus all, or set ALLOW_CPU=true to train on the CPU")
    return "warning: no GPU is visible; training on the CPU (ALLOW_CPU=true)"


def check_agent(environ: Mapping[str, str]) -> list[str]:
    """The `wandb agent` command line for SWEEP_ID; it needs the W&B server."""
    sweep = environ.get("SWEEP_ID", "").strip()
    if not sweep:
        raise UserError("APP_MODE=agent needs SWEEP_ID (entity/project/sweep_id, printed by `python -m app sweep create`)")
    if len(sweep.split("/")) not in (1, 3) or not all(sweep.split("/")):
        raise UserError(f"SWEEP_ID={sweep!r} must be SWEEP or ENTITY/PROJECT/SWEEP")
    mode = environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun", "disabled"):
        raise UserError(
            f"SWEEP_ID is set but WANDB_MODE={mode}: a W&B sweep is served by the W&B server and cannot run offline; "
            "unset WANDB_MODE (AGENT_RUN_MODE=offline keeps the runs themselves offline)"
        )
    if not tracking.has_api_key(environ):
        raise UserError("SWEEP_ID is set but there is no W&B API key: set WANDB_API_KEY (in .env or the environment)")
    run_mode = environ.get("AGENT_RUN_MODE", "").strip().lower()
    if run_mode and run_mode not in tracking.MODES:
        raise UserError(f"AGENT_RUN_MODE={run_mode!r} must be one of: {', '.join(tracking.MODES)}")
    count = environ.get("AGENT_COUNT", "").strip()
    if count and (not count.isdigit() or int(count) < 1):
        raise UserError(f"AGENT_COUNT={count!r} must be a positive integer (runs per agent; unset = until the sweep ends)")
    wandb_cli = shutil.which("wandb") or "wandb"
    # --forward-signals: the agent starts each run in its own process group, out of reach of the
    # SIGTERM that `docker stop` (via the init) sends; forwarded, the run checkpoints and exits preempted
    return [wandb_cli, "agent", "--forward-signals", *(["--count", count] if count else []), sweep]


def check_folders(environ: Mapping[str, str]) -> None:
    for setting, default in (("WANDB_DIR", "."), ("OUTPUT_DIR", "outputs")):
        tracking.check_writable(Path(environ.get(setting) or default), setting)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ if environ is None else environ)
    if argv and not argv[0].startswith("-"):
        os.execvp(argv[0], argv)  # `docker run IMAGE bash` and friends
    try:
        mode = choose_mode(environ)
        check_folders(environ)
        warning = check_gpu(environ, gpus_visible())
        if mode == "agent":
            command = check_agent(environ)
            if argv:
                raise UserError(f"arguments {' '.join(argv)!r} are not used by an agent: the sweep sets the settings")
            run_mode = environ.get("AGENT_RUN_MODE", "").strip().lower()
            if run_mode:
                environ["WANDB_MODE"] = run_mode  # read by the runs the agent starts
            from app.sweep import dedupe

            dedupe.stagger(environ)  # a bad AGENT_START_STAGGER fails here, before any slot is taken
        elif mode == "offline-sweep":
            from app.sweep import offline as offline_sweep

            offline_sweep.check_environment(environ)
        else:
            tracking.resolve_mode(environ)
            config.load(argv, environ, dotenv_path=None)  # a bad setting fails here, before the GPU warning
        if mode != "run":
            from app.container import gpu_slots

            # several agents share the host's GPUs: each claims one slot and trains on that GPU only
            # (no GPU found: nothing to claim, unless GPU_COUNT names devices to spread over)
            environ = gpu_slots.assign(environ)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if mode == "agent":
        from app.sweep import dedupe

        # agents started together ask W&B for work at the same moment, when duplicates are most likely
        dedupe.wait_stagger(environ)
        print(f"starting: {' '.join(command)}", flush=True)
        os.execvpe(command[0], command, environ)
    if mode == "offline-sweep":
        from app.sweep import offline as offline_sweep

        return offline_sweep.run_agent(environ)
    from app.cli import main as cli_main

    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
