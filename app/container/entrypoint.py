"""The container's entrypoint: picks a single run or a sweep agent from the environment.

    docker run IMAGE                          -> one training run (settings from the environment)
    docker run IMAGE --epochs=1               -> one training run with these --key=value settings
    docker run -e SWEEP_ID=e/p/id IMAGE       -> `wandb agent e/p/id` (runs `python -m app train ...`)
    ... -e AGENT_PROCESS=warm                 -> the same sweep, every run in one warm child process (app.sweep.wandb.warm_agent)
    docker run -e SWEEP_CONFIG=/app/s.yaml IMAGE -> an offline sweep agent (no W&B server)
    docker run IMAGE bash                     -> any other command runs as given

APP_MODE=run|agent|offline-sweep overrides the choice. In every mode the training settings, the W&B
mode and the folders are checked before any work starts; a problem is one line with exit code 2.
A stop (`docker stop`: SIGTERM) exits 128+signal (143), a finished run or sweep 0.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import sys
import time
from typing import Mapping

from app import interrupts, preflight, runner, settings, sources, tracking
from app.errors import UserError

MODES = settings.setting("APP_MODE").choices


def gpus_visible() -> bool:
    """Device nodes the NVIDIA runtime mounts for `--gpus`; no torch import needed to see them."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def choose_mode(environ: Mapping[str, str]) -> str:
    mode = settings.get("APP_MODE", environ)
    sweep_id, sweep_config = settings.is_set("SWEEP_ID", environ), settings.is_set("SWEEP_CONFIG", environ)
    if mode == "auto":
        mode = "agent" if sweep_id else "offline-sweep" if sweep_config else "run"
    elif mode == "agent" and not sweep_id and sweep_config:
        mode = "offline-sweep"  # the compose `agent` service given a sweep YAML instead of a sweep id
    return mode


def check_gpu(environ: Mapping[str, str], has_gpu: bool) -> str | None:
    """Refuse to train a GPU job on the CPU by accident; ALLOW_CPU=true makes it a warning."""
    device = settings.get("DEVICE", environ).lower()
    if device == "cpu" or has_gpu:
        return None
    if device.startswith("cuda"):
        raise UserError(f"DEVICE={device!r} but no GPU is visible in the container: run with --gpus all (or the compose GPU reservation)")
    if not settings.get("ALLOW_CPU", environ):
        raise UserError("no GPU is visible in the container: run with --gpus all, or set ALLOW_CPU=true to train on the CPU")
    return "warning: no GPU is visible; training on the CPU (ALLOW_CPU=true)"


def check_agent(environ: Mapping[str, str]) -> list[str]:
    """The `wandb agent` command line for SWEEP_ID; it needs the W&B server."""
    sweep = settings.get("SWEEP_ID", environ)
    if not sweep:
        raise UserError("APP_MODE=agent needs SWEEP_ID (entity/project/sweep_id, printed by `python -m app sweep create`)")
    if len(sweep.split("/")) not in (1, 3) or not all(sweep.split("/")):
        raise UserError(f"SWEEP_ID={sweep!r} must be SWEEP or ENTITY/PROJECT/SWEEP")
    tracking.require_server(environ, "SWEEP_ID is set", "AGENT_RUN_MODE=offline keeps the runs themselves offline")
    if not tracking.has_api_key(environ):
        raise UserError("SWEEP_ID is set but there is no W&B API key: set WANDB_API_KEY (in .env or the environment)")
    settings.get("AGENT_RUN_MODE", environ)
    settings.get("AGENT_OUTAGE_S", environ)  # a bad bound fails here, not when the server first goes quiet
    count = settings.get("AGENT_COUNT", environ)
    from app.sweep.wandb.warm_agent import process_kind

    process_kind(environ)  # a bad AGENT_PROCESS fails here, before any work
    wandb_cli = shutil.which("wandb") or "wandb"
    # --forward-signals: the agent starts each run in its own process group, out of reach of the
    # SIGTERM that `docker stop` (via the init) sends; forwarded, the run checkpoints and exits preempted
    return [wandb_cli, "agent", "--forward-signals", *(["--count", str(count)] if count else []), sweep]


def agent_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What the agent's runs see: AGENT_RUN_MODE becomes their WANDB_MODE."""
    run_mode = settings.get("AGENT_RUN_MODE", environ)
    return {**environ, "WANDB_MODE": run_mode} if run_mode else dict(environ)


def check_runs(environ: Mapping[str, str]) -> None:
    """The training settings every run of an agent starts from, checked once before the agent starts
    (a bad one would otherwise fail every run the sweep hands out): W&B mode, writable WANDB_DIR and
    OUTPUT_DIR, the settings against the data."""
    preflight.check(sources.load([], environ, dotenv_path=None), environ)


def run_child(command: list[str], environ: Mapping[str, str]) -> int:
    """Run `command` (the agent) with SIGTERM/SIGINT passed on to it (interrupts.run_forwarding); exit
    128+signal after a stop, so `docker stop` (143) tells apart from a finished sweep (the agent's 0)."""
    code, stopped = interrupts.run_forwarding(command, environ)
    if stopped:
        print(f"agent stopped by {signal.Signals(stopped).name} (exit {128 + stopped}); its running run, if any, "
              "was passed the signal", file=sys.stderr, flush=True)
        return 128 + stopped
    return code if code >= 0 else 128 - code


def start(argv: list[str], environ: dict[str, str]) -> int:
    """Every check of the chosen mode before any work, then the work."""
    mode = choose_mode(environ)
    if mode == "run":
        # the run's own checks: settings, W&B mode, folders (compose's env_file made .env the environment)
        run = runner.prepare(argv, environ, dotenv_path=None)
        warning = check_gpu(environ, gpus_visible())
        if warning:
            print(warning, file=sys.stderr, flush=True)
        return runner.run(run)
    warning = check_gpu(environ, gpus_visible())
    if argv:
        raise UserError(f"arguments {' '.join(argv)!r} are not used by an agent: the sweep sets the settings")
    from app.container import gpu_slots

    gpu_slots.check(environ)  # before an offline sweep's storage is opened (its first agent creates it)
    if mode == "agent":
        command = check_agent(environ)
        run_env = agent_environment(environ)
        check_runs(run_env)
        from app.sweep.wandb import dedupe

        dedupe.stagger(run_env)  # a bad AGENT_START_STAGGER fails here, before any slot is taken
    else:
        from app.sweep.optuna import agent as offline_agent
        from app.sweep.optuna.plan import plan

        sweep_plan = plan(environ)  # the sweep YAML and the settings, read but not yet opened
        check_runs(environ)  # the base settings against the data, before the sweep's storage is opened
        offline_agent.check_environment(environ, sweep_plan)
        run_env = environ
    # several agents share the host's GPUs: each claims one slot and trains on that GPU only
    # (no GPU found: nothing to claim, unless GPU_COUNT names devices to spread over)
    run_env = gpu_slots.assign(run_env)
    # the offline-sweep agent trains in this very process, and CUDA takes its devices from the process's
    # environment when it starts: the slot goes there too (a `wandb agent` or warm child gets run_env)
    os.environ.update({k: v for k, v in run_env.items() if k in gpu_slots.EXPORTS})
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if mode == "offline-sweep":
        return offline_agent.run_agent(run_env)
    # agents started together ask W&B for work at the same moment, when duplicates are most likely
    dedupe.wait_stagger(run_env)
    from app.sweep.wandb import supervisor, warm_agent

    if warm_agent.process_kind(environ) == "warm":
        # every run in one warm child process, replaced if it crashes; it inherits the GPU slot's lock
        return supervisor.supervise(settings.get("SWEEP_ID", environ), run_env, settings.get("AGENT_COUNT", environ))
    from app.sweep.wandb import best, orphans

    sweep = settings.get("SWEEP_ID", environ)
    started = time.time()  # the runs whose sweep values `wandb agent` writes from now on are this agent's
    # runs a job-wide stop took from W&B (it will not hand them out again): resumed first, and once more
    # when the sweep has nothing more for this agent (one may have been stopped meanwhile)
    code = orphans.resume_all(run_env, sweep, lambda doc: orphans.resume_in_child(doc, run_env, sweep))
    if code:
        return code
    print(f"starting: {' '.join(command)}", flush=True)
    # W&B's command line in a process that mutes a lost service's tracebacks (app.sweep.wandb.agent_process)
    code = run_child([sys.executable, "-m", "app.sweep.wandb.agent_process", *command[1:]], run_env)
    code = code or orphans.resume_all(run_env, sweep, lambda doc: orphans.resume_in_child(doc, run_env, sweep))
    if code == 0:  # the sweep is done for this agent: its best run so far, as the warm agent ends
        settings.tidy_wandb()  # W&B's client here reads this process's environment: no empty WANDB_ values
        own = best.own_runs(run_env, sweep.split("/")[-1], since=started)
        print(best.closing_line(None, sweep, own, environ, whose="the runs trained here since this agent started"),
              flush=True)
    return code


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if environ is None:  # what runs in the image says so in its hints (the paths it prints exist only inside)
        os.environ[tracking.CONTAINER_MARK] = "1"
    environ = dict(os.environ if environ is None else environ)
    if argv and not argv[0].startswith("-"):
        os.execvp(argv[0], argv)  # `docker run IMAGE bash` and friends
    interrupts.install()  # a stop during start-up: one line and 128+signal, no traceback
    settings.tidy_wandb(environ)  # what W&B reads from the environment: no empty values, modes as checked
    return runner.handle(start, argv, environ)


if __name__ == "__main__":
    sys.exit(main())
