"""Command line: `python -m app <command>`. Run `python -m app --help` for the list."""

from __future__ import annotations

import importlib
import os
import sys

from app import config as cfg
from app import interrupts, runner

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
  env --reference           every setting the project reads: kind, default, meaning, where it applies

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


def cmd_train(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(train_help())
        return 0
    from app import ranks

    if ranks.is_follower(os.environ):  # torchrun's rank > 0: rank 0's values and run, never W&B's
        from app.train import follow

        ranks.quiet_signals(interrupts.note)  # a stop before the ranks meet is agreed at the first step
        return follow(*ranks.join_torchrun(os.environ))
    from app.sweep.wandb import dedupe  # `wandb agent` starts sweep runs through this command

    return dedupe.run_once(args, os.environ, lambda: runner.prepare(args), dotenv_path=".env")


# each command lives in its own module, imported only when called: `train` must not pay for docker or optuna
COMMANDS = {
    "train": "app.cli:cmd_train",
    "sweep": "app.sweep.wandb.create:main",
    "launch": "app.container.launch:main",
    "offline-agent": "app.sweep.optuna.agent:main",
    "sweep-status": "app.sweep.optuna.status:main",
    "sweep-repair": "app.sweep.optuna.journal:main",
    "sync": "app.runs.sync:main",
    "report": "app.runs.report:main",
    "bundle": "app.container.bundle:main",
    "env": "app.settings_cli:main",
}


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
    return runner.handle(lambda: getattr(importlib.import_module(module), func)(rest))
