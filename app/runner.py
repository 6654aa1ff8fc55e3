"""The one way into a training run, for every mode: `prepare` reads the settings once and checks
everything before work starts, `run` trains and turns the outcome into the exit code `wandb agent`
expects, `handle` turns a user's mistake or a stop into one line and an exit code.

    start = runner.prepare(["--epochs=1"])    # .env, the config, the W&B mode, the folders: checked
    code = runner.run(start)                 # 0 done (or diverged), 128+signal stopped (checkpointed)

Used by `python -m app train` (app.cli), the warm W&B agent (app.sweep.wandb.warm_agent) and the
container's entrypoint; a W&B sweep's run goes through app.sweep.wandb.dedupe.run_once first.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, MutableMapping, Protocol

from app import config as cfg
from app import interrupts, settings, sources, tracking
from app.errors import UserError

if TYPE_CHECKING:
    from app.train import EpochHook  # the hook's type only: `--help` and a skipped duplicate never load torch


@dataclass
class Start:
    """What `prepare` checked, for `run`."""
    args: list[str]
    config: cfg.Config
    environ: MutableMapping[str, str]
    ready: object  # preflight.Ready (imported with the run: keeps `--help` light)


class Claim(Protocol):
    """A sweep run's hold on its parameters (app.sweep.wandb.dedupe): closed with how the run ended."""

    def close(self, outcome: str) -> None: ...


# how a run ended, for its claim; ORPHANED: preempted, but W&B was not told (its service was gone), so
# W&B will never hand it out again and an agent on the sweep resumes it (app.sweep.wandb.orphans)
PREEMPTED, ORPHANED, FINISHED = "preempted", "orphaned", "finished"


def prepare(args: list[str], environ: MutableMapping[str, str] | None = None,
            dotenv_path: str | None = ".env") -> Start:
    """Read .env once, load the config once, resolve the W&B mode and check WANDB_DIR / OUTPUT_DIR once.

    .env's other settings (WANDB_*) apply as if exported, under the real environment; empty values
    are unset and are dropped before W&B could read them."""
    from app import preflight

    environ = os.environ if environ is None else environ
    dotenv = sources.read_dotenv(dotenv_path, environ) if dotenv_path and os.path.exists(dotenv_path) else {}
    config = sources.load(args, environ, dotenv_path=dotenv_path, dotenv=dotenv)  # errors name .env as the source
    if dotenv:
        sources.apply_dotenv(environ, dotenv_path)
    settings.tidy_wandb(environ)  # what W&B reads from the environment: no empty values, modes as checked
    return Start(args, config, environ, preflight.check_environment(config, environ))


def run(start: Start, last: bool = True, on_epoch: EpochHook | None = None, claim: Claim | None = None) -> int:
    """The checked run: train(), exit code as `wandb agent` expects.
    `last=False`: the process goes on to another run (a warm agent), so a stop stays a stop after this one.
    `on_epoch`: train()'s hook; True after an epoch ends the run early (a warm agent's early_terminate stop).
    `claim`: a sweep run's hold on its parameters, closed with how the run ended."""
    from app.ranks import RankLost
    from app.train import Preempted, train  # here: a skipped duplicate never loads torch

    try:
        result = train(start.config, start.environ, on_epoch=on_epoch, ready=start.ready)
    except RankLost as lost:  # the run is recorded as failed (exit 1); the agent goes on to the next
        print(f"error: {lost}", file=sys.stderr, flush=True)
        return 1
    except Preempted as stop:
        if claim:
            claim.close(PREEMPTED if stop.told else ORPHANED)  # the requeued run (same id) takes the params back
        print(stop_line(stop, in_sweep=claim is not None), file=sys.stderr)
        return 128 + stop.signum
    if claim:
        claim.close(FINISHED)
    if last:
        interrupts.finished()  # the run is recorded: a stop from here on is no failure
    # after W&B's own lines (the run is finished): where the run is and how to upload it, then the result
    if result.get("upload"):
        print(result["upload"], file=sys.stderr, flush=True)
    if result.get("diverged"):  # a finished run (exit 0): `wandb agent` goes on, W&B keeps its summary
        print(f"done: run {result['run_id']} diverged: {result['diverged_at']}; stopped there (no test or export)",
              flush=True)
    elif result["pruned"]:
        print(f"done: run {result['run_id']} stopped early (val_accuracy {result['val_accuracy']:.4f}; no test or export)", flush=True)
    else:
        onnx = tracking.host_path(result["onnx"], {"OUTPUTS_DIR_HOST": Path(start.config.output_dir)}, start.environ)
        print(f"done: run {result['run_id']} test_accuracy {result['test_accuracy']:.4f} onnx {onnx}", flush=True)
    return 0


def stop_line(stop, in_sweep: bool) -> str:
    """What a stopped run says: whether W&B was told (a job-wide stop can end W&B's service first)."""
    if stop.told:
        return f"{stop}: checkpoint written, run marked preempting"
    then = ("the next agent on this sweep resumes it from its checkpoint" if in_sweep
            else "start it again with its WANDB_RUN_ID to resume it")
    return f"{stop}: checkpoint written, but W&B's service had already stopped, so W&B was not told the run is preempting: {then}"


def stopped_line(stop: interrupts.Stopped) -> str:
    return f"{stop} before training started or after it ended: nothing to checkpoint (exit {stop.exit_code})"


def handle(command, *args) -> int:
    """Run a command; a UserError is one `error:` line and exit 2, a stop one line and 128+signal."""
    try:
        return command(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except interrupts.Stopped as stop:
        print(stopped_line(stop), file=sys.stderr)
        return stop.exit_code
    finally:
        tracking.shutdown()


def exit_after_run(code: int) -> None:
    """End a `train` process without the interpreter's teardown of every module it loaded.

    With torch, W&B and onnx loaded, that teardown takes 0.5-1 s, paid by every run a `wandb agent`
    starts, and it does nothing a finished run needs: the exit handlers still run (W&B's service
    teardown, logging's flush, anything registered), then the streams are flushed. The run itself was
    finished and flushed by `run.finish()` before this."""
    import atexit

    atexit._run_exitfuncs()  # what normal shutdown runs first; the module teardown after it is skipped
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
