"""`python -m app sweep`: check a sweep YAML locally, or create the W&B sweep from it.

    python -m app sweep validate sweeps/grid.yaml
    python -m app sweep create sweeps/grid.yaml [--project P] [--entity E]

`create` validates first (W&B accepts a typo'd parameter or a metric training never logs and the sweep
then optimises nothing), then calls `wandb.sweep` and prints the full ENTITY/PROJECT/SWEEP_ID and the
line to put in `.env` for the agents. It needs a W&B API key (WANDB_API_KEY, `.env`, or `wandb login`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from app import tracking
from app.errors import UserError
from app.sweep import spec as sweep_spec

USAGE = "usage: python -m app sweep {validate,create} FILE [--project P] [--entity E]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line + exit 2 through the CLI, not argparse's usage dump
        raise UserError(f"sweep: {message} ({USAGE})")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m app sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="{validate,create}", parser_class=_Parser)
    v = sub.add_parser("validate", help="check a sweep YAML without contacting W&B")
    v.add_argument("file")
    c = sub.add_parser("create", help="validate, then create the sweep on W&B and print its id")
    c.add_argument("file")
    c.add_argument("--project", help="W&B project (default: the YAML's project, WANDB_PROJECT, or %s)" % tracking.DEFAULT_PROJECT)
    c.add_argument("--entity", help="W&B entity (default: the YAML's entity, WANDB_ENTITY, or your default entity)")
    return p


def describe(spec: sweep_spec.SweepSpec) -> str:
    metric = f"{spec.goal} {spec.metric}" if spec.metric else "no metric"
    size = f"{spec.grid_size} grid points" if spec.method == "grid" else f"run_cap {spec.run_cap or 'none'}"
    return f"{spec.method} sweep over {', '.join(p.name for p in spec.params)}; {metric}; {size}"


def create(spec: sweep_spec.SweepSpec, project: str | None, entity: str | None,
           environ=os.environ) -> str:
    """Create the sweep on the W&B server; returns ENTITY/PROJECT/SWEEP_ID."""
    from app import settings, sources

    sources.apply_dotenv(environ)  # WANDB_API_KEY / WANDB_BASE_URL from .env, checked as `train` checks it
    if not tracking.has_api_key(environ):
        raise UserError("sweep create needs a W&B API key: set WANDB_API_KEY (in .env or the environment) or run `wandb login`")
    tracking.require_server(environ, "sweep create needs the W&B server",
                            "or run the YAML with no server: python -m app offline-agent")
    project = project or spec.raw.get("project") or settings.get("WANDB_PROJECT", environ)
    entity = entity or spec.raw.get("entity") or settings.get("WANDB_ENTITY", environ)
    tracking.prepare_wandb_environ(environ)  # W&B reads WANDB_MODE itself: as checked, not ` Online`

    import wandb

    config = dict(spec.raw)
    # wandb.sweep prints its own lines; ours are the ones to copy, so keep its chatter on stderr
    with contextlib.redirect_stdout(sys.stderr):
        try:
            sweep_id = wandb.sweep(config, entity=entity, project=project)
        except wandb.errors.CommError as exc:
            raise UserError(f"could not reach W&B to create the sweep ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        except wandb.errors.UsageError as exc:
            raise UserError(f"W&B refused the sweep: {str(exc).splitlines()[0]}") from None
        # wandb.sweep stores the entity the server filed the sweep under in WANDB_ENTITY
        entity = entity or settings.get("WANDB_ENTITY") or wandb.Api().default_entity
    return f"{entity}/{project}/{sweep_id}"


def main(argv: list[str]) -> int:
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv)
    spec = sweep_spec.load(args.file)
    if args.action == "validate":
        print(f"ok: {args.file}: {describe(spec)}")
        return 0
    path = create(spec, args.project, args.entity)
    print(f"created: {path} ({describe(spec)})")
    print("put this line in .env for the agents (docker compose up agent --scale agent=N):")
    print(f"SWEEP_ID={path}")
    return 0
