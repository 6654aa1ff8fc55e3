"""The trained model as a versioned W&B artifact of type `model`, in every mode.

Called once at the end of a finished run (app.train): `log_model(run, config, files, figures, environ)`.
The artifact is `<dataset>-convnet` (`mnist-convnet`, `fashion-mnist-convnet`): one collection per
model and data, so its versions compare like with like and `latest` is the newest model whatever made
it (a single run, a W&B sweep trial, an offline sweep trial). It holds `model.onnx` and the final
`checkpoint.pt`, with metadata: the effective config, test metrics, the ONNX check's figures, the
dataset, the torch/onnx/onnxruntime versions, and the sweep (name, metric, value) for a trial.

Aliases: `latest` always. An offline sweep trial also gets `best-<sweep>` when its value of the
sweep's metric beats every trial completed before it in the sweep's storage (the journal or
PostgreSQL the agents share; the trial's agent keeps the best so far up to date, reading only what
finished since it last looked): that is known without a server. A W&B sweep's best is only known to the
W&B server (other agents' results live there), so its trials get no best alias; the metadata carries
the sweep and metric so the W&B UI or `wandb.Api().sweep(...).best_run()` can find it.

Offline runs and later syncs: W&B records each artifact file by its local path and reads it only when
`wandb sync` uploads the run, hours later, perhaps on another host or outside the container that made
it. So the files are copied into the run folder itself (`offline-run-*/model-artifact/`) and recorded
by a path relative to the folder that holds the run folder: `python -m app sync` runs `wandb sync`
from there, wherever the runs folder is mounted or copied (with plain `wandb sync`, run it inside the
`wandb/` folder). The files are added with W&B's "immutable" policy, so nothing is staged in W&B's
data folder (WANDB_DATA_DIR, default ~/.local/share/wandb: gone with a container) and nothing a later
sync needs lives outside the run folder. An online run still names a staging folder while it uploads:
it is pointed under WANDB_DIR when WANDB_DATA_DIR is unset, so hosts and containers behave the same.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from app import places, settings, tracking

FOLDER = "model-artifact"  # inside the run folder: the copies the artifact records
DATA_DIR = ".wandb-data"  # under WANDB_DIR: W&B's staging folder when WANDB_DATA_DIR is unset


def artifact_name(dataset: str) -> str:
    return f"{dataset.replace('_', '-')}-convnet"


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


SweepResults = Callable[[], "tuple[str, str, list[float]] | None"]
"""For an offline sweep trial: (metric, goal, values to beat: the trials completed so far, or just the best
of them), read when the run ends; None when they can't be read. The sweep's agent provides it from what it
already holds (app.sweep.optuna.trial._completed: the best so far, never the whole sweep read again)."""


def beats(value: Any, goal: str, others: list[float]) -> bool:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return all(value > v if goal == "maximize" else value < v for v in others)


@dataclass
class Recorded:
    """A model artifact as an offline run's log holds it (before W&B gives it a version number)."""

    name: str
    aliases: list[str]
    size: int  # bytes, all files
    digest: str
    files: list[str]
    metadata: dict[str, Any]

    def label(self) -> str:
        """`name:latest +best-sweep (479 kB)`."""
        first, *more = sorted(self.aliases, key=lambda a: a != "latest") or ["(no alias)"]
        size = f"{self.size / 1e6:.2f} MB" if self.size >= 1e6 else f"{self.size / 1e3:.0f} kB"
        return f"{self.name}:{first}" + "".join(f" +{a}" for a in more) + f" ({size})"


def recorded(run_folder: Path) -> list[Recorded]:
    """The model artifacts an offline run logged, read from its log; [] when it can't be read."""
    from app import runlog

    found = []
    try:
        for record in runlog.records(next(Path(run_folder).glob("run-*.wandb"))):
            if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "model":
                a = record.artifact
                try:
                    metadata = json.loads(a.metadata or "{}")
                except ValueError:
                    metadata = {}
                found.append(Recorded(a.name, list(a.aliases), sum(c.size for c in a.manifest.contents), a.digest,
                                      [c.path for c in a.manifest.contents], metadata))
    except (StopIteration, OSError, ValueError):  # no log, or a damaged one: the run's own report says so
        pass
    return found


def best_claim(run_folder: Path) -> float | None:
    """For an offline run whose model artifact claims a `best-<sweep>` alias: its value of the sweep's
    metric, signed so that higher is better; None when it claims none.

    W&B moves an alias to the version it commits last, and `wandb sync` uploads several runs at once:
    `python -m app sync` uploads the claiming runs last, one at a time in this order, so the alias ends
    on the best of them."""
    for art in recorded(run_folder):
        if any(a.startswith("best-") for a in art.aliases):
            sweep = art.metadata.get("sweep") or {}
            value = sweep.get("value")
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value) if sweep.get("goal") == "maximize" else -float(value)
    return None


def _alias_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "sweep"


def log_model(run, config, files: list[Path], figures: Mapping[str, Any], environ: Mapping[str, str],
              sweep_results: SweepResults | None = None) -> str | None:
    """Log `files` as this run's model artifact; returns the artifact's name (None when W&B is disabled).

    `figures`: the run's final numbers (test_accuracy, test_loss, the ONNX check, val metrics).
    `sweep_results`: an offline sweep trial's view of its sweep, for the `best-<sweep>` alias.
    """
    if run.disabled:
        return None
    import wandb

    offline = tracking.is_offline(run)
    run_folder = Path(run.dir).parent
    sweep = run.group or ""  # offline sweep trials are grouped under the sweep's name
    metadata: dict[str, Any] = {
        "run_id": run.id,
        "dataset": config.dataset,
        "config": config.to_dict(),
        "input": {"name": "images", "dtype": "float32", "shape": ["N", 1, 28, 28], "range": [0, 1]},
        **{k: _finite(v) for k, v in figures.items()},
        **versions(),
    }
    if run.sweep_id:
        metadata["wandb_sweep"] = run.sweep_id
    aliases = ["latest"]
    results = sweep_results() if sweep_results is not None and sweep else None
    if results is not None:
        metric, goal, done = results
        value = figures.get(metric)
        metadata["sweep"] = {"name": sweep, "metric": metric, "goal": goal, "value": _finite(value)}
        if beats(value, goal, done):
            aliases.append(f"best-{_alias_part(sweep)}")
    artifact = wandb.Artifact(artifact_name(config.dataset), type="model", metadata=metadata,
                              description=f"ConvNet {config.kernels} on {config.dataset}; run {run.id}")
    folder = run_folder / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        copy = folder / path.name
        # the run's own copy (the outputs folder may be gone at sync time), whole or not at all
        places.copy_file(path, copy, "the model artifact", "free space on the volume of WANDB_DIR, then rerun this "
                         "run id to test and export it again")
        entry = artifact.add_file(str(copy), name=path.name, policy="immutable")
        if offline:
            # read at sync time: a path relative to the folder holding the run folder (see the docstring)
            entry.local_path = os.path.relpath(copy, run_folder.parent)
    data_dir = {} if settings.is_set("WANDB_DATA_DIR", environ) else {
        "WANDB_DATA_DIR": str((settings.runs_root(environ) / DATA_DIR).resolve())}
    with tracking.environment(**data_dir):
        run.log_artifact(artifact, aliases=aliases)
    return artifact.name
