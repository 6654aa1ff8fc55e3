"""`wandb agent` as W&B's own command runs it, in a process whose exit says a lost service in one line.

    python -m app.sweep.wandb.agent_process agent --forward-signals ENTITY/PROJECT/SWEEP

A job-wide stop (a plain `scancel`) ends W&B's service under the agent too; W&B's exit handler and
its finalizer thread then print `ConnectionResetError` and asyncio's `socket.send() raised exception`
as tracebacks, although nothing failed: the stop itself is said by the entrypoint. This runs W&B's
command line (`wandb.cli.cli`) after muting exactly those (app.interrupts); every other error prints.
"""

from __future__ import annotations

import sys

from app import interrupts

if __name__ == "__main__":
    interrupts.quiet_wandb_lost()
    from wandb.cli.cli import cli

    sys.argv = ["wandb", *sys.argv[1:]]
    sys.exit(cli())
