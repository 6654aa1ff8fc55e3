"""What a sweep YAML means to an offline (Optuna) sweep: the plan every agent checks before any work.

    python -m app offline-agent --config sweeps/grid.yaml     (app.sweep.optuna.agent runs the plan)

`plan(environ)` reads SWEEP_CONFIG, SWEEP_STORAGE, AGENT_COUNT, SWEEP_HEARTBEAT_S and the training
settings, and returns a `Plan` or raises one `UserError` line. Nothing is written here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from app import settings
from app.config import Config, ConfigError
from app.sources import load as load_config
from app.errors import UserError
from app.sweep import spec as sweep_spec
from app.sweep.optuna.space import SearchSpace, search_space
from app.sweep.spec import SweepSpec, SweepSpecError

@dataclass(frozen=True)
class Plan:
    spec: SweepSpec
    name: str  # study name, W&B group
    space: SearchSpace
    storage_url: str  # a journal file path, or a postgresql:// URL
    count: int | None  # trials this agent runs; None = until the sweep is done
    heartbeat_s: float
    base: Config  # the training config from .env / environment, before the trial's values
    metric: str
    goal: str

    @property
    def grid_size(self) -> int | None:
        if self.spec.method != "grid":
            return None
        return math.prod(len(d.distribution.choices) for d in self.space.dimensions)


def sweep_name(spec: SweepSpec, path: str) -> str:
    """The study name (and W&B group): the YAML's `name`, else its file name, made file-safe."""
    raw = spec.name or Path(path).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(raw)).strip("-.")[:100] or "sweep"


def redact(url: str) -> str:
    """A storage URL with its password replaced, for messages and logs."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def storage_url(environ: Mapping[str, str], name: str) -> str:
    url = settings.get("SWEEP_STORAGE", environ)
    if not url:
        return str(settings.runs_root(environ) / "sweeps" / f"{name}.journal")
    if "://" not in url:
        return url  # a journal file path
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("sqlite"):
        raise UserError("SWEEP_STORAGE=sqlite:... is not safe with several agents (Optuna's SQLite storage does not lock "
                        "the trial it pops); leave SWEEP_STORAGE unset for the journal file on the runs volume")
    if scheme not in ("postgresql", "postgresql+psycopg2", "postgres"):
        raise UserError(f"SWEEP_STORAGE={redact(url)!r}: use a postgresql://user:password@host/db URL, "
                        "or a journal file path (unset = $WANDB_DIR/sweeps/<name>.journal)")
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver installed here is psycopg2
    return "postgresql+psycopg2" + url[len(scheme):]


def plan(environ: Mapping[str, str]) -> Plan:
    path = settings.get("SWEEP_CONFIG", environ)
    if not path:
        raise UserError("an offline sweep needs SWEEP_CONFIG: the path of a sweep YAML such as sweeps/grid.yaml")
    mode = settings.get("WANDB_MODE", environ)
    if mode not in (None, "offline", "dryrun"):
        raise UserError(f"WANDB_MODE={mode}: an offline sweep records every trial as an offline W&B run; "
                        "unset WANDB_MODE or set it to offline (upload later with: python -m app sync)")
    spec = sweep_spec.load(path)
    space = search_space(spec)
    name = sweep_name(spec, path)
    base = load_config(environ=environ, dotenv_path=None)
    try:
        base.replace(**space.constants)
    except ConfigError as exc:
        raise SweepSpecError(f"{path}: {exc}") from None
    return Plan(
        spec=spec, name=name, space=space, storage_url=storage_url(environ, name),
        count=settings.get("AGENT_COUNT", environ),
        heartbeat_s=settings.get("SWEEP_HEARTBEAT_S", environ),
        base=base,
        # W&B lets grid and random sweeps omit the metric; Optuna needs a value, so record val_loss
        metric=spec.metric or "val_loss",
        goal=spec.goal if spec.metric else "minimize",
    )
