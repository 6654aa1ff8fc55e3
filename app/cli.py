"""Command line: `python -m app <command>`. Run `python -m app --help` for the list."""

from __future__ import annotations

import importlib
import os
import sys

from app import config as cfg
from app.errors import UserError

USAGE = """usage: python -m app <command> [options]

commands:
  train [--key=value ...]   one tracked training run (the form `wandb agent` calls with ${args})
  sweep ...                 validate a sweep YAML / create a W&B sweep from it
  launch ...                start N agent containers pinned to GPUs (docker SDK)
  offline-agent ...         run trials of a sweep YAML with no W&B server (Optuna)
  sweep-status ...          the trials table and best trial of an offline sweep
  sync [PATH]               upload unsynced offline runs with `wandb sync`
  report ...                render offline runs and sweeps to SVG / HTML
  bundle save|load ...      carry image + data + settings to an air-gapped host

Settings for `train` (lowest precedence first): defaults < .env < environment (KEY in upper case,
e.g. EPOCHS=3) < --key=value < a W&B sweep's values. `python -m app train --help` lists them.
W&B: WANDB_MODE=online|offline|disabled (default: online with an API key, else offline), WANDB_DIR,
WANDB_PROJECT, WANDB_ENTITY.
"""


def train_help() -> str:
    return (
        "usage: python -m app train [--key=value ...]\n\n"
        "One W&B-tracked training run. Each key can also be set in .env or the environment in upper case\n"
        "(EPOCHS=3); --key=value wins over both, and a W&B sweep's values win over everything.\n\n"
        f"keys (with defaults):\n{cfg.describe()}\n"
    )


def cmd_train(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(train_help())
        return 0
    from dotenv import load_dotenv

    load_dotenv(".env", override=False)  # WANDB_* settings in .env apply too; the real environment wins
    config = cfg.load(args, os.environ, dotenv_path=".env")
    from app.sweep import dedupe

    # a sweep run first claims its parameters: W&B may have handed the same ones to another agent
    with dedupe.guard(os.environ, args) as claim:
        if claim and claim.duplicate_of:
            print(dedupe.skip_message(claim), file=sys.stderr)
            return 0  # exit 0: a finished trial to the agent, not a failure that could stop it
        from app.train import Preempted, train  # after the check: a skipped duplicate never loads torch

        try:
            result = train(config)
        except Preempted as stop:
            if claim:
                claim.close(dedupe.PREEMPTED)  # the requeued run (same id) takes the params back
            print(f"{stop}: checkpoint written, run marked preempting", file=sys.stderr)
            return 128 + stop.signum
        if claim:
            claim.close(dedupe.FINISHED)
    print(f"done: run {result['run_id']} test_accuracy {result['test_accuracy']:.4f} onnx {result['onnx']}")
    return 0


# each command lives in its own module, imported only when called: `train` must not pay for docker or optuna
COMMANDS = {
    "train": "app.cli:cmd_train",
    "sweep": "app.sweep.wandb_sweep:main",
    "launch": "app.container.launch:main",
    "offline-agent": "app.sweep.offline:main",
    "sweep-status": "app.sweep.offline:status_main",
    "sync": "app.runs.sync:main",
    "report": "app.runs.report:main",
    "bundle": "app.container.bundle:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, _, func = COMMANDS[command].partition(":")
    try:
        return getattr(importlib.import_module(module), func)(rest)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
