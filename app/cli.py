"""Command line: `python -m app <command>`. Run `python -m app --help` for the list."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, MutableMapping

from app import config as cfg
from app import env, interrupts, tracking
from app.errors import UserError

if TYPE_CHECKING:
    from app.train import EpochHook  # the hook's type only: `--help` and a skipped duplicate never load torch

USAGE = """usage: python -m app <command> [options]

commands:
  train [--key=value ...]   one tracked training run (the form `wandb agent` calls with ${args})
  sweep ...                 validate a sweep YAML / create a W&B sweep from it
  launch ...                start N agent containers pinned to GPUs (docker SDK)
  offline-agent ...         run trials of a sweep YAML with no W&B server (Optuna)
  sweep-status ...          the trials table and best trial of an offline sweep
  sweep-repair JOURNAL      repair an offline sweep's journal damaged by a crash (keeps a copy)
  sync [PATH]               upload unsynced offline runs with `wandb sync`
  report ...                render offline runs and sweeps to SVG / HTML
  bundle save|load ...      carry image + data + settings to an air-gapped host
  env --export FILE         a .env file's checked settings as shell export lines (for scripts)

Settings for `train` (lowest precedence first): {precedence}.
`python -m app train --help` lists them. An empty value (KEY=) is unset.
W&B: WANDB_MODE=online|offline|disabled (default: online with an API key, else offline), WANDB_DIR,
WANDB_PROJECT, WANDB_ENTITY.
"""


def train_help() -> str:
    return (
        "usage: python -m app train [--key=value ...]\n\n"
        "One W&B-tracked training run. Each key can also be set in .env or the environment in upper case\n"
        f"(EPOCHS=3). Precedence, lowest first: {cfg.PRECEDENCE}.\n\n"
        f"keys (with defaults):\n{cfg.describe()}\n"
    )


@dataclass
class Start:
    """What `prepare` checked, for `run`: the one way into a training run (CLI and container)."""
    args: list[str]
    config: cfg.Config
    environ: MutableMapping[str, str]
    ready: object  # preflight.Ready (imported with the run: keeps `--help` light)


def prepare(args: list[str], environ: MutableMapping[str, str] | None = None,
            dotenv_path: str | None = ".env") -> Start:
    """Read .env once, load the config once, resolve the W&B mode and check WANDB_DIR / OUTPUT_DIR once.

    .env's other settings (WANDB_*) apply as if exported, under the real environment; empty values
    are unset and are dropped before W&B could read them."""
    from app import preflight

    environ = os.environ if environ is None else environ
    dotenv = cfg.read_dotenv(dotenv_path) if dotenv_path and os.path.exists(dotenv_path) else {}
    config = cfg.load(args, environ, dotenv_path=dotenv_path, dotenv=dotenv)  # errors name .env as the source
    if dotenv:
        cfg.apply_dotenv(environ, dotenv_path)
    env.drop_empty_wandb(environ)
    return Start(args, config, environ, preflight.check_environment(config, environ))


def run(start: Start, last: bool = True, on_epoch: EpochHook | None = None) -> int:
    """The checked run: a sweep's duplicate guard, then train(); exit code as `wandb agent` expects.
    `last=False`: the process goes on to another run (a warm agent), so a stop stays a stop after this one.
    `on_epoch`: train()'s hook; True after an epoch ends the run early (a warm agent's early_terminate stop)."""
    from app.sweep import dedupe

    # a sweep run first claims its parameters: W&B may have handed the same ones to another agent
    with dedupe.guard(start.environ, start.args) as claim:
        if claim and claim.duplicate_of:
            print(dedupe.skip_message(claim), file=sys.stderr)
            dedupe.record_duplicate(claim, start.ready.mode)  # visible in the sweep: it used up a hand-out
            return 0  # exit 0: a finished trial to the agent, not a failure that could stop it
        from app.train import Preempted, train  # after the check: a skipped duplicate never loads torch

        try:
            result = train(start.config, start.environ, on_epoch=on_epoch, ready=start.ready)
        except Preempted as stop:
            if claim:
                claim.close(dedupe.PREEMPTED)  # the requeued run (same id) takes the params back
            print(f"{stop}: checkpoint written, run marked preempting", file=sys.stderr)
            return 128 + stop.signum
        if claim:
            claim.close(dedupe.FINISHED)
    if last:
        interrupts.finished()  # the run is recorded: a stop from here on is no failure
    if result["pruned"]:
        print(f"done: run {result['run_id']} stopped early (val_accuracy {result['val_accuracy']:.4f}; no test or export)", flush=True)
    else:
        print(f"done: run {result['run_id']} test_accuracy {result['test_accuracy']:.4f} onnx {result['onnx']}", flush=True)
    return 0


def cmd_train(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(train_help())
        return 0
    return run(prepare(args))


def stopped_line(stop: interrupts.Stopped) -> str:
    return f"{stop} before training started or after it ended: nothing to checkpoint (exit {stop.exit_code})"


# each command lives in its own module, imported only when called: `train` must not pay for docker or optuna
COMMANDS = {
    "train": "app.cli:cmd_train",
    "sweep": "app.sweep.wandb_sweep:main",
    "launch": "app.container.launch:main",
    "offline-agent": "app.sweep.agent:main",
    "sweep-status": "app.sweep.status:main",
    "sweep-repair": "app.sweep.journal:main",
    "sync": "app.runs.sync:main",
    "report": "app.runs.report:main",
    "bundle": "app.container.bundle:main",
    "env": "app.env:main",
}


def exit_after_run(code: int) -> None:
    """End a `train` process without the interpreter's teardown of every module it loaded.

    With torch, W&B and onnx loaded, that teardown takes 0.5-1 s, paid by every run a `wandb agent`
    starts, and it does nothing a finished run needs: the exit handlers still run (W&B's service
    teardown, logging's flush, anything registered), then the streams are flushed. The run itself was finished and flushed by `run.finish()` before this."""
    import atexit

    atexit._run_exitfuncs()  # what normal shutdown runs first; the module teardown after it is skipped
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    interrupts.install()  # a stop during start-up: one line, not a KeyboardInterrupt traceback
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.replace("{precedence}", cfg.PRECEDENCE))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, _, func = COMMANDS[command].partition(":")
    return handle(lambda: getattr(importlib.import_module(module), func)(rest))


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
