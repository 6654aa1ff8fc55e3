"""The one place that reads the environment: typed getters whose errors name the variable.

    from app import env
    env.flag("ALLOW_CPU")                      # true/false/1/0/yes/no/on/off; unset or empty -> default
    env.positive_int("AGENT_COUNT")            # None when unset
    env.choice("APP_MODE", ("auto", "run"), "auto")
    env.path("OUTPUT_DIR", "outputs")

Every getter takes `environ=` (a mapping such as a container's environment being assembled);
without it, `os.environ`. An EMPTY value (`WANDB_MODE=` in a shell or a `.env` line) counts as
unset everywhere, and `drop_empty_wandb()` removes such values before W&B reads them itself (its own
settings reject an empty WANDB_MODE). `.env` files are read with `read_dotenv`: a line that does not
parse or a key nobody reads (a typo such as EPOCH=3) is one error naming the line. Shell scripts
(deploy/slurm/agents.sbatch) read them through the same reader:

    eval "$(python -m app env --export .env)"   # export KEY='value' lines; a variable already set wins
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Iterable, Mapping, MutableMapping

from app.errors import UserError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
# read by the package, the container, compose or the build besides the training keys (upper-cased
# config keys, which config.py adds); WANDB_* are W&B's own and all allowed
DOCUMENTED = frozenset({
    "APP_MODE", "SWEEP_ID", "SWEEP_CONFIG", "SWEEP_STORAGE", "SWEEP_HEARTBEAT_S", "SWEEP_DEDUPE",
    "SWEEP_CLAIMS_DIR", "AGENT_COUNT", "AGENT_RUN_MODE", "AGENT_PROCESS", "AGENT_START_STAGGER", "AGENT_INDEX",
    "AGENTS_PER_GPU", "GPU_COUNT", "GPU_SLOTS_DIR", "GPU_HOST_ID", "ALLOW_CPU", "APP_IMAGE", "IMAGE",
    "UID", "GID", "NETRC", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "BASE_IMAGE", "SYNC_TIMEOUT_S",
    "TORCH_INDEX_URL", "DATA_DIR_HOST", "RUNS_DIR_HOST", "OUTPUTS_DIR_HOST", "APP_IN_CONTAINER",
    "APP_PYTHON", "APP_EXEC", "REQUEUE_ON_STOP",  # deploy/slurm/agents.sbatch
})
MAX_DOTENV_BYTES = 256 * 1024  # a settings file is a few KiB; anything bigger is the wrong file
# W&B's own settings, compose's, docker's and pip's (build arguments), and the runtime's: a .env also
# feeds the containers (compose env_file, launch), where thread counts, CUDA/NCCL and proxy settings belong
ALLOWED_PREFIXES = ("WANDB_", "COMPOSE_", "DOCKER_", "PIP_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "NCCL_",
                    "TORCH_", "PYTORCH_", "NVIDIA_", "PYTHON", "LC_", "SLURM_")
RUNTIME = frozenset({"TZ", "LANG", "HOME", "PATH", "TMPDIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"})


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def text(name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None) -> str | None:
    """The stripped value; `default` when unset or empty."""
    value = _environ(environ).get(name)
    if value is None or not value.strip():
        return default
    return value.strip()


def is_set(name: str, *, environ: Mapping[str, str] | None = None) -> bool:
    return text(name, environ=environ) is not None


def flag(name: str, default: bool = False, *, environ: Mapping[str, str] | None = None) -> bool:
    value = text(name, environ=environ)
    if value is None:
        return default
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise UserError(f"{name}={value!r} must be true or false (also 1/0, yes/no, on/off)")


def _number(name: str, default, environ, parse, fits, kind: str, meaning: str):
    value = text(name, environ=environ)
    if value is None:
        return default
    try:
        number = parse(value)
    except ValueError:
        number = None
    if number is None or not fits(number):
        raise UserError(f"{name}={value!r} must be {kind}{f' ({meaning})' if meaning else ''}")
    return number


def positive_int(name: str, default: int | None = None, *, environ: Mapping[str, str] | None = None,
                 meaning: str = "") -> int | None:
    """An integer >= 1; `meaning` (e.g. "runs per agent") is added to the error."""
    return _number(name, default, environ, int, lambda n: n >= 1, "a positive integer", meaning)


def non_negative_float(name: str, default: float | None = None, *, environ: Mapping[str, str] | None = None,
                       positive: bool = False, meaning: str = "") -> float | None:
    """A finite number >= 0 (> 0 with positive=True)."""
    return _number(name, default, environ, float, lambda n: math.isfinite(n) and (n > 0 if positive else n >= 0),
                   "a positive number" if positive else "a number >= 0", meaning)


def choice(name: str, allowed: Iterable[str], default: str | None = None, *,
           environ: Mapping[str, str] | None = None) -> str | None:
    """One of `allowed`, compared lower-case."""
    allowed = tuple(allowed)
    value = text(name, environ=environ)
    if value is None:
        return default
    if value.lower() not in allowed:
        raise UserError(f"{name}={value!r} must be one of: {', '.join(allowed)}")
    return value.lower()


def path(name: str, default: str | os.PathLike, *, environ: Mapping[str, str] | None = None) -> Path:
    return Path(text(name, environ=environ) or default)


def runs_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where W&B writes its `wandb/` folder, offline sweeps their journals: WANDB_DIR, else here."""
    return path("WANDB_DIR", ".", environ=environ)


def run_id(environ: Mapping[str, str] | None = None) -> str | None:
    """WANDB_RUN_ID checked against the run id rule (`app.runid`); None when unset or empty."""
    from app import runid

    value = _environ(environ).get("WANDB_RUN_ID")
    if value is None or not value.strip():
        return None
    return runid.check(value, "WANDB_RUN_ID")  # unstripped: W&B itself refuses surrounding whitespace


def drop_empty_wandb(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove WANDB_* variables whose value is empty: unset for us, but W&B's settings reject some
    of them (WANDB_MODE=). Call before W&B is imported or a run starts. Returns the names dropped."""
    environ = os.environ if environ is None else environ
    empty = [k for k, v in environ.items() if k.startswith("WANDB_") and not v.strip()]
    for k in empty:
        del environ[k]
    return empty


def known(name: str, extra: Iterable[str] = ()) -> bool:
    return (name in DOCUMENTED or name in set(extra) or name.startswith(ALLOWED_PREFIXES)
            or name.upper() in RUNTIME)


def read_dotenv(file: str | os.PathLike, extra_known: Iterable[str] = ()) -> dict[str, str]:
    """The settings of a `.env` file, empty values left out (= unset). A line that does not parse,
    or a key that nothing reads (`extra_known`: the training keys), is a UserError naming the line."""
    from dotenv.parser import parse_stream

    extra = set(extra_known)
    try:
        if os.path.getsize(file) > MAX_DOTENV_BYTES:
            raise UserError(f"{file} is over {MAX_DOTENV_BYTES // 1024} KiB: not a settings file")
        with open(file, encoding="utf-8-sig") as stream:  # a BOM (some Windows editors) is not part of the key
            bindings = list(parse_stream(stream))
    except UnicodeDecodeError:
        raise UserError(f"{file} is not a text file of KEY=value lines") from None
    except OSError as exc:
        raise UserError(f"cannot read {file} ({exc.strerror or exc})") from None
    values: dict[str, str] = {}
    for b in bindings:
        raw = b.original.string
        # a binding starts with the blank lines before it: count them to name the line itself
        where = f"{file}:{b.original.line + raw[:len(raw) - len(raw.lstrip())].count(chr(10))}"
        if b.error:
            shown = raw.strip().splitlines()[0][:60] if raw.strip() else ""
            raise UserError(f"{where}: {shown!r} is not a KEY=value line")
        if b.key is None:
            continue  # a comment or a blank line
        if not known(b.key, extra):
            close = difflib.get_close_matches(b.key, sorted(DOCUMENTED | extra), n=1)
            hint = f"; did you mean {close[0]}?" if close else "; `python -m app train --help` lists the training keys"
            raise UserError(f"{where}: unknown setting {b.key}{hint}")
        if b.value is not None and b.value.strip():
            values[b.key] = b.value.strip()
    return values


def export_lines(values: Mapping[str, str], environ: Mapping[str, str] | None = None) -> str:
    """`export KEY='value'` lines (shell-quoted: nothing in a value is evaluated) for the settings not
    already set in `environ`: a variable exported where the script runs wins over the file."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items()
                   if not is_set(key, environ=environ) and key not in BUILD_IDS)


# the image build's user ids (compose's build args, in `.env.example`): no setting of a job, which runs as
# its submitter; and bash's UID is read-only (`export UID=...` prints "UID: readonly variable")
BUILD_IDS = frozenset({"UID", "GID"})


# what a container must not take from the host: its own PATH, HOME, locale and Python, the build's and
# compose's settings (host paths and ids), and the host-side settings of deploy/slurm/agents.sbatch
HOST_ONLY = frozenset({"APP_PYTHON", "APP_EXEC", "REQUEUE_ON_STOP", "APP_IN_CONTAINER", "NETRC", "UID", "GID",
                       "IMAGE", "APP_IMAGE", "BASE_IMAGE", "TORCH_INDEX_URL", "DATA_DIR_HOST", "RUNS_DIR_HOST",
                       "OUTPUTS_DIR_HOST"})


def container_lines(environ: Mapping[str, str], extra_known: Iterable[str] = ()) -> str:
    """The settings in `environ` (known names only) as KEY=VALUE lines of a `podman/docker run --env-file`:
    what the job's environment passes into the image, the image's own ENV under it."""
    extra = set(extra_known)
    out = []
    for key, value in sorted(environ.items()):
        if (not known(key, extra) or key in HOST_ONLY or key.upper() in RUNTIME
                or key.startswith(("PYTHON", "LC_", "PIP_", "DOCKER_", "COMPOSE_")) or not value.strip()):
            continue
        if "\n" in value or "\r" in value:
            raise UserError(f"{key} holds a line break: a container's --env-file cannot carry it")
        out.append(f"{key}={value}\n")
    return "".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app env",
        description="Print a .env file's settings, checked as every reader of the package checks them, as "
                    "shell `export` lines for eval (variables already set in the environment are left out); "
                    "or, with --container, the settings of this environment for a container runtime.")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--export", metavar="FILE", help="the .env file to read")
    how.add_argument("--container", action="store_true",
                     help="instead: the known settings of this environment as a container's --env-file")
    args = parser.parse_args(argv)
    from app import config  # the training keys are known settings too

    if args.container:
        sys.stdout.write(container_lines(os.environ, config.ENV_NAMES))
        return 0
    if not os.path.isfile(args.export):
        raise UserError(f"{args.export}: no such file")
    sys.stdout.write(export_lines(config.read_dotenv(args.export)))
    return 0
