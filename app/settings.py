"""Every setting the project reads, declared once, and the one place that reads them from the environment.

    from app import settings
    settings.get("AGENT_COUNT", environ)     # typed, the declared default when unset or empty
    settings.get("ALLOW_CPU")                # without `environ`: os.environ
    settings.is_set("SWEEP_ID", environ)

`TABLE` holds one `Setting` per name that the package, the image's entrypoint, compose, the Kubernetes
manifests, scripts/build-image and deploy/slurm/agents.sbatch read: its kind, default, one-line meaning
and scope (where it applies). The training keys' entries come from `Config` itself (app.config: the key
in upper case, its type, default and the comment beside it). Reading a name that is not declared is a
KeyError: a typo in the code fails its tests. The `.env` check (app.sources), `python -m app env`
(--container, --reference: docs/settings.md; app.settings_cli) and the tests of .env.example, compose,
the k8s settings and the sbatch script work from this table.

A small table of our own rather than pydantic-settings: no new dependency in the hash-locked image,
`--help` and `train` stay light, and our rules (an EMPTY value is unset everywhere, a mistake is one
line naming the variable and what it allows) are ours to keep, not a library's to change.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, MutableMapping

from app import config as cfg
from app import runid
from app.errors import UserError

# where a setting applies: which lists it belongs in (.env.example, compose, a container's --env-file)
TRAINING = "training"  # a training key: .env, the environment (upper case) or --key=value
WANDB = "wandb"  # W&B's own setting, which the package reads too
AGENT = "agent"  # sweep agents, W&B or offline, in or out of the container
CONTAINER = "container"  # the image's entrypoint
HOST = "host"  # read on the host only (compose, launch, sync, agents.sbatch): never passed into a container
BUILD = "build"  # building the image (scripts/build-image, docker compose build)
GIVEN = "given"  # set for a process by what starts it (wandb agent, Slurm, a runtime, the package): not for .env
SCOPES = (TRAINING, WANDB, AGENT, CONTAINER, HOST, BUILD, GIVEN)


@dataclass(frozen=True)
class Setting:
    name: str
    # text | flag | count (int >= 1) | whole (int >= 0) | number (float >= 0) | choice | path | run id;
    # a training key's int | float | list are read by app.config.coerce, as the config reads them
    kind: str
    default: Any  # None: unset (the meaning says what unset does)
    scope: str
    meaning: str
    choices: tuple[str, ...] = ()
    unit: str = ""  # what a number counts, for its error line
    positive: bool = False  # number: > 0 rather than >= 0
    most: float | None = None  # number, count: the largest allowed

    def __post_init__(self) -> None:
        assert self.scope in SCOPES and self.kind in KINDS, self


KINDS = ("text", "flag", "count", "whole", "number", "choice", "path", "run id", "int", "float", "list")
MODES = ("online", "offline", "disabled")  # W&B's modes (WANDB_MODE also takes "dryrun", its old offline)
_CONFIG_KINDS = {"int": "int", "float": "float", "bool": "flag", "str": "text"}


def _training() -> list[Setting]:
    """The training keys as `Config` declares them: its field types, defaults and comments."""
    defaults, meanings = cfg.Config(), cfg.notes()
    out = []
    for f in fields(cfg.Config):
        kind = _CONFIG_KINDS.get(getattr(f.type, "__name__", str(f.type)), "list")
        kind = "choice" if f.name in cfg.CHOICES else kind
        out.append(Setting(f.name.upper(), kind, getattr(defaults, f.name), TRAINING, meanings.get(f.name, ""),
                           cfg.CHOICES.get(f.name, ())))
    return out


_DECLARED = [
    # --- W&B's own ---
    Setting("WANDB_API_KEY", "text", None, WANDB, "API key from https://wandb.ai/authorize; unset: the one "
            "`wandb login` stored in NETRC, else runs are offline"),
    Setting("WANDB_MODE", "choice", None, WANDB, "online | offline | disabled (dryrun = offline); unset: online "
            "with an API key, else offline", (*MODES, "dryrun")),
    Setting("WANDB_PROJECT", "text", "pytorch-mnist", WANDB, "W&B project the runs and sweeps belong to"),
    Setting("WANDB_ENTITY", "text", None, WANDB, "W&B team or user the runs and sweeps belong to; unset: the "
            "API key's default entity"),
    Setting("WANDB_BASE_URL", "text", "https://api.wandb.ai", WANDB, "the W&B server (a self-hosted one's URL)"),
    # `runs` on the host as in the image (/runs, the volume compose mounts from ./runs): one layout, so
    # sweep-status, report and sync find a sweep with no arguments wherever it ran
    Setting("WANDB_DIR", "path", "runs", WANDB, "the runs folder: W&B's wandb/ runs, offline sweeps' "
            "sweeps/*.journal, GPU slots and sweep claims; must be writable"),
    Setting("WANDB_RUN_ID", "run id", None, WANDB, "the run's id, which names its folder: set it to resume that "
            "run from OUTPUT_DIR/<id>/checkpoint.pt (`wandb agent` sets it for sweep runs)"),
    Setting("WANDB_DATA_DIR", "path", None, WANDB, "where W&B stages a model artifact's files; unset: "
            "WANDB_DIR/.wandb-data"),
    Setting("WANDB_QUIET", "flag", True, WANDB, "W&B's own start and end lines kept short (unset: true; our "
            "lines say where a run is and how to upload it); false: W&B's summary and sync hint too"),
    # --- sweep agents ---
    Setting("SWEEP_ID", "text", None, AGENT, "the W&B sweep the agents serve: ENTITY/PROJECT/ID as `python -m app "
            "sweep create` prints it"),
    Setting("SWEEP_CONFIG", "text", None, AGENT, "an offline sweep's YAML (no W&B server), e.g. /app/sweeps/grid.yaml "
            "in the image"),
    Setting("SWEEP_STORAGE", "text", None, AGENT, "an offline sweep's storage: a journal file or postgresql://user:"
            "password@host/db for agents on several hosts; unset: WANDB_DIR/sweeps/<name>.journal"),
    Setting("SWEEP_HEARTBEAT_S", "number", 10.0, AGENT, "seconds between an offline agent's heartbeats; a trial "
            "silent for 4 of them is rerun elsewhere", unit="seconds between heartbeats", positive=True),
    Setting("SWEEP_DEDUPE", "flag", True, AGENT, "skip a W&B sweep run whose values another agent is running or "
            "has finished"),
    Setting("SWEEP_CLAIMS_DIR", "path", None, AGENT, "shared folder for those claims; unset: WANDB_DIR/.sweep-claims"),
    Setting("AGENT_COUNT", "count", None, AGENT, "runs (offline: trials) each agent does before it exits; unset: "
            "until the sweep ends", unit="runs per agent; unset = until the sweep ends"),
    Setting("AGENT_RUN_MODE", "choice", None, AGENT, "WANDB_MODE of the runs an agent starts (the agent itself "
            "talks to the W&B server); unset: WANDB_MODE", MODES),
    Setting("AGENT_PROCESS", "choice", "per-run", AGENT, "per-run: `wandb agent` starts a process per run | warm: "
            "every run in the agent's one process", ("per-run", "warm")),
    Setting("AGENT_START_STAGGER", "number", 0.0, AGENT, "agent k waits k x this many seconds before asking W&B "
            "for work: fewer duplicate configs", unit="seconds", most=600),
    Setting("AGENT_OUTAGE_S", "number", 60.0, AGENT, "seconds W&B's server may go without answering before a warm "
            "W&B agent stops with one line, its run checkpointed", unit="seconds", positive=True, most=3600),
    Setting("AGENTS_PER_GPU", "count", None, AGENT, "agents sharing one GPU: caps the slots per GPU and gives "
            "each 1/N of its memory from the start", unit="agents sharing one GPU"),
    Setting("GPU_COUNT", "whole", None, AGENT, "use GPUs 0..N-1 without looking for devices (0 = none)",
            unit="GPUs (0 = none)"),
    Setting("GPU_SLOTS_DIR", "path", None, AGENT, "shared folder for the GPU slot locks; unset: WANDB_DIR/.gpu-slots"),
    Setting("GPUS_PER_TRIAL", "count", 1, AGENT, "GPUs one trial (or run) trains on, as that many DDP ranks "
            "(the CPU: gloo ranks); an agent reserves this many whole GPUs", unit="GPUs per trial, at most 64",
            most=64),
    Setting("RANK_TIMEOUT_S", "number", 120.0, AGENT, "with GPUS_PER_TRIAL > 1: seconds a rank may keep the "
            "others waiting in a training step's exchange (and to meet) before the trial fails naming it; raise it "
            "for steps slower than that", unit="seconds", positive=True, most=3600),
    Setting("GPU_HOST_ID", "text", None, AGENT, "this host's name in GPU slot keys when its GPUs have no UUID; "
            "unset: the machine id"),
    # --- the image's entrypoint ---
    Setting("APP_MODE", "choice", "auto", CONTAINER, "auto (SWEEP_ID: agent, SWEEP_CONFIG: offline sweep, else "
            "one run) | run | agent | offline-sweep", ("auto", "run", "agent", "offline-sweep")),
    Setting("ALLOW_CPU", "flag", False, CONTAINER, "train on the CPU when no GPU is visible instead of refusing"),
    Setting("RUNS_DIR_HOST", "text", "runs", CONTAINER, "the runs volume's folder on the host (compose mounts it "
            "at /runs): the end-of-run upload hint names it"),
    Setting("OUTPUTS_DIR_HOST", "text", "./outputs", CONTAINER, "the outputs volume's folder on the host (compose "
            "mounts it at /outputs): a run's last line names its model there"),
    # --- host only ---
    Setting("UID", "text", "1000", HOST, "host user compose runs the container as: it owns ./data ./runs ./outputs"),
    Setting("GID", "text", "1000", HOST, "that user's group"),
    Setting("IMAGE", "text", "mnist-sweeps:latest", HOST, "the image compose runs and builds"),
    Setting("DATA_DIR_HOST", "text", "./data", HOST, "compose's host folder for /data"),

    Setting("APP_IMAGE", "text", "mnist-sweeps:latest", HOST, "the image `python -m app launch` runs (--image wins)"),
    Setting("NETRC", "path", "~/.netrc", HOST, "where `wandb login` stored the API key"),
    Setting("SYNC_TIMEOUT_S", "count", 120, HOST, "`python -m app sync`: seconds per run before an upload is "
            "given up (--timeout wins)", unit="seconds per run before an upload is given up"),
    Setting("ENV_FILE", "path", ".env", HOST, "agents.sbatch: the settings file it reads (export it at sbatch)"),
    Setting("APP_PYTHON", "path", ".venv/bin/python", HOST, "agents.sbatch: the Python that reads ENV_FILE and "
            "runs the agent (export it at sbatch: ENV_FILE is read by it)"),
    Setting("APP_EXEC", "text", None, HOST, "agents.sbatch: run the agent in the image with this command, e.g. "
            "podman run --env-file $APP_ENV_FILE ... IMAGE; unset: APP_PYTHON runs it"),
    Setting("REQUEUE_ON_STOP", "flag", True, HOST, "agents.sbatch: requeue the task after a stop (time limit, "
            "scancel --signal) while the job still runs"),
    # --- building the image ---
    Setting("BASE_IMAGE", "text", "nvidia/cuda:13.0.1-base-ubuntu24.04", BUILD, "the image's base (the "
            "Dockerfile's ARG; scripts/build-image --base-image)"),
    Setting("TORCH_INDEX_URL", "text", None, BUILD, "scripts/build-image: where torch is downloaded from; unset: "
            "the index pip is configured with"),
    # --- given to a process by what starts it ---
    Setting("WANDB_SWEEP_ID", "text", None, GIVEN, "the W&B sweep of this run (`wandb agent`, the warm agent)"),
    Setting("WANDB_SWEEP_PARAM_PATH", "path", None, GIVEN, "the file holding a sweep run's values (`wandb agent`)"),
    Setting("AGENT_INDEX", "whole", 0, GIVEN, "agents holding a GPU slot when this one claimed its own (the slot "
            "claim): staggers starts", unit="agents started before this one"),
    Setting("GPU_SLOT", "text", None, GIVEN, "the GPU slot this agent holds (the slot claim): a run's memory share"),
    Setting("NVIDIA_VISIBLE_DEVICES", "text", None, GIVEN, "the host's ids of the container's GPUs (the NVIDIA "
            "runtime, the Kubernetes device plugin, launch)"),
    Setting("CUDA_VISIBLE_DEVICES", "text", None, GIVEN, "GPUs this process may use (Slurm, or by hand): the "
            "agent then claims no GPU slot"),
    Setting("SLURM_JOB_ID", "text", None, GIVEN, "the Slurm job this process runs in (Slurm)"),
    Setting("SLURM_ARRAY_JOB_ID", "text", None, GIVEN, "the job array this task belongs to (Slurm)"),
    Setting("SLURM_ARRAY_TASK_ID", "text", None, GIVEN, "this task's index in its job array (Slurm)"),
    Setting("APP_IN_CONTAINER", "flag", False, GIVEN, "started by the image's entrypoint: hints name host paths"),
    Setting("APP_ENV_FILE", "path", None, GIVEN, "agents.sbatch: the --env-file it writes for APP_EXEC"),
    Setting("RANK", "whole", None, GIVEN, "this process's rank in a trial's DDP ranks (torchrun)", unit="the rank"),
    Setting("WORLD_SIZE", "count", None, GIVEN, "how many ranks train the trial (torchrun)", unit="ranks"),
    Setting("LOCAL_RANK", "whole", None, GIVEN, "this rank's index on its host: its GPU (torchrun)", unit="the rank"),
]

TABLE: dict[str, Setting] = {s.name: s for s in (*_training(), *_DECLARED)}
assert len(TABLE) == len(cfg.KEYS) + len(_DECLARED), "a setting declared twice"


def setting(name: str) -> Setting:
    """The declaration of `name`; an undeclared name is a bug in the caller (KeyError)."""
    try:
        return TABLE[name]
    except KeyError:
        raise KeyError(f"{name} is not a declared setting: declare it in app/settings.py") from None


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ  # the only read of os.environ for a setting


def raw(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value as set, unstripped; None when unset or empty."""
    setting(name)
    value = _environ(environ).get(name)
    return None if value is None or not value.strip() else value


def text(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The stripped value, None when unset or empty (whatever the kind: for messages and checks)."""
    value = raw(name, environ)
    return None if value is None else value.strip()


def is_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    return raw(name, environ) is not None


def present(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Set and not empty, for any name a `.env` may hold (another program's too: OMP_NUM_THREADS)."""
    assert known(name), name
    return bool((_environ(environ).get(name) or "").strip())


def get(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The value read as its declaration says, or the declared default when unset or empty; a value
    that doesn't fit is a UserError naming the variable and what it allows."""
    s = setting(name)
    value = raw(name, environ)
    if value is None:
        return Path(s.default) if s.kind == "path" and s.default is not None else s.default
    if s.scope == TRAINING:  # the training key's own type and its error line (it names the key)
        return cfg.coerce(name.lower(), value, "environment")
    return _READ[s.kind](s, value)


def _flag(s: Setting, value: str) -> bool:
    word = value.strip().lower()
    if word in cfg.TRUE:  # the training keys' words
        return True
    if word in cfg.FALSE:
        return False
    raise UserError(f"{s.name}={value.strip()!r} must be true or false (also 1/0, yes/no, on/off)")


def _number(s: Setting, value: str) -> float:
    number = float(value) if cfg.FLOAT_FORM.fullmatch(value.strip()) else math.nan  # the training keys' forms
    if s.most is not None:
        if not (0 < number <= s.most if s.positive else 0 <= number <= s.most):
            above = "above 0, at most" if s.positive else "between 0 and"
            raise UserError(f"{s.name}={value.strip()!r} must be {s.unit or 'a number'} {above} {s.most:g}")
    elif not (math.isfinite(number) and (number > 0 if s.positive else number >= 0)):
        noun = "a positive number" if s.positive else "a number >= 0"
        raise UserError(f"{s.name}={value.strip()!r} must be {noun}{f' ({s.unit})' if s.unit else ''}")
    return number


def _count(s: Setting, value: str) -> int:
    try:
        number = int(value) if cfg.INT_FORM.fullmatch(value.strip()) else 0  # not 1_000 or ١٢, as int() takes
    except ValueError:  # over Python's 4300 digits
        number = 0
    if number < 1 or (s.most is not None and number > s.most):
        raise UserError(f"{s.name}={value.strip()!r} must be a positive integer{f' ({s.unit})' if s.unit else ''}")
    return number


def _whole(s: Setting, value: str) -> int:
    # ASCII digits only: isdigit() took '²', which int() refuses; and at most what int() reads
    if not re.fullmatch(r"[0-9]{1,4000}", value.strip()):
        raise UserError(f"{s.name}={value.strip()!r} must be a whole number{f' of {s.unit}' if s.unit else ''}")
    return int(value)


def _choice(s: Setting, value: str) -> str:
    if value.strip().lower() not in s.choices:
        raise UserError(f"{s.name}={value.strip()!r} must be one of: {', '.join(s.choices)}")
    return value.strip().lower()


_READ = {
    "text": lambda s, v: v.strip(),
    "path": lambda s, v: Path(v.strip()),
    "flag": _flag,
    "number": _number,
    "count": _count,
    "whole": _whole,
    "choice": _choice,
    "run id": lambda s, v: runid.check(v, s.name),  # unstripped: W&B itself refuses surrounding whitespace
}


def runs_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where W&B writes its `wandb/` folder, offline sweeps their journals: WANDB_DIR, else ./runs."""
    return get("WANDB_DIR", environ)


def drop_empty_wandb(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove WANDB_* variables whose value is empty: unset for us, but W&B's settings reject some
    of them (WANDB_MODE=). Call before W&B is imported or a run starts. Returns the names dropped."""
    environ = os.environ if environ is None else environ
    empty = [k for k, v in environ.items() if k.startswith("WANDB_") and not v.strip()]
    for k in empty:
        del environ[k]
    return empty


# the modes as W&B reads them: from os.environ, validated by its own settings case- and space-sensitively
# (` OFFLINE` is a pydantic traceback after our check passed it), while ours are case-blind
_MODES_W_AND_B_READS = ("WANDB_MODE", "AGENT_RUN_MODE")  # AGENT_RUN_MODE becomes the runs' WANDB_MODE


def tidy_wandb(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """`drop_empty_wandb`, then the modes written back as our check reads them (lower case, stripped),
    so W&B reads what we checked. A value that is no mode is left as it is: its check refuses it in one
    line. Call before W&B is imported or a run starts. Returns the names dropped."""
    environ = os.environ if environ is None else environ
    dropped = drop_empty_wandb(environ)
    for name in _MODES_W_AND_B_READS:
        value = environ.get(name)
        if value is not None and value.strip().lower() in TABLE[name].choices:
            environ[name] = value.strip().lower()
    return dropped


# --- what else a .env may hold: the containers' runtime settings, not typos ---

# W&B's own settings, compose's, docker's and pip's (build arguments), and the runtime's: a .env also
# feeds the containers (compose env_file, launch), where thread counts, CUDA/NCCL and proxy settings belong
ALLOWED_PREFIXES = ("WANDB_", "COMPOSE_", "DOCKER_", "PIP_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "NCCL_",
                    "TORCH_", "PYTORCH_", "NVIDIA_", "PYTHON", "LC_", "SLURM_")
RUNTIME = frozenset({"TZ", "LANG", "HOME", "PATH", "TMPDIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"})


def known(name: str) -> bool:
    """A name a `.env` may set: declared, or another program's (the prefixes and the runtime's)."""
    return name in TABLE or name.startswith(ALLOWED_PREFIXES) or name.upper() in RUNTIME


def did_you_mean(name: str) -> str | None:
    import difflib

    close = difflib.get_close_matches(name, sorted(TABLE), n=1)
    return close[0] if close else None
