"""The training config from its sources, and `.env` files read and checked line by line.

    config = sources.load(["--epochs=1"])       # defaults < .env < environment < command line
    values = sources.read_dotenv(".env")        # KEY -> value; a bad line or an unknown key is one error
    sources.apply_dotenv(os.environ)            # .env under the environment, as if exported

The precedence is app.config's (PRECEDENCE); the names a `.env` may hold are app.settings' table (and
the runtime settings its prefixes allow). An EMPTY value (`EPOCHS=` in a shell or a `.env` line) is unset.
Shell scripts (deploy/slurm/agents.sbatch) read a `.env` through the same reader:

    eval "$(python -m app env --export .env)"   # export KEY='value' lines; a variable already set wins
"""

from __future__ import annotations

import os
import re
from typing import Mapping, MutableMapping

from app import interpolation, settings
from app.config import KEYS, Config, merge, parse_cli
from app.errors import UserError

MAX_DOTENV_BYTES = 256 * 1024  # a settings file is a few KiB; anything bigger is the wrong file
# how a binding's value starts (python-dotenv's own grammar: export, a key maybe in single quotes, `=`): its quote
_VALUE_START = re.compile(r"\s*(?:export[^\S\r\n]+)?(?:'[^']+'|[^=#\s]+)[^\S\r\n]*=[^\S\r\n]*(['\"]?)")


def from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The config keys an environment sets: each key in upper case (EPOCHS, BATCH_SIZE, ...); empty = unset."""
    found = {k: settings.text(k.upper(), environ) for k in KEYS}
    return {k: v for k, v in found.items() if v is not None}


def load(
    cli_args: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike | None = ".env",
    dotenv: Mapping[str, str] | None = None,
) -> Config:
    """Defaults < .env < environment < command line. (The sweep's layer is applied in train.)

    `dotenv_path` is read here; `dotenv` passes a `.env` already read (`read_dotenv`) instead."""
    environ = os.environ if environ is None else environ
    cfg = Config()
    if dotenv is None and dotenv_path and os.path.exists(dotenv_path):
        dotenv = read_dotenv(dotenv_path, environ)
    if dotenv:
        cfg = merge(cfg, from_environ(dotenv), source=str(dotenv_path or ".env"))
    cfg = merge(cfg, from_environ(environ), source="environment")
    return merge(cfg, parse_cli(cli_args or []), source="command line")


def read_dotenv(file: str | os.PathLike, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings of a `.env` file, empty values left out (= unset). A line that does not parse,
    or a key that nothing reads (not declared in app.settings, nor another program's), is a UserError
    naming the line. `${VAR}` in a value is expanded as docker compose does, from `environ` (default:
    os.environ) and the file's earlier lines (app.interpolation: refused where python-dotenv differs)."""
    from dotenv.parser import parse_stream

    environ = os.environ if environ is None else environ
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
    earlier: dict[str, str] = {}  # every line so far, expanded, empty ones too: what a later ${VAR} reads
    for b in bindings:
        raw = b.original.string
        # a binding starts with the blank lines before it: count them to name the line itself
        where = f"{file}:{b.original.line + raw[:len(raw) - len(raw.lstrip())].count(chr(10))}"
        if b.error:
            shown = raw.strip().splitlines()[0][:60] if raw.strip() else ""
            raise UserError(f"{where}: {shown!r} is not a KEY=value line")
        if b.key is None:
            continue  # a comment or a blank line
        if not settings.known(b.key):
            close = settings.did_you_mean(b.key)
            hint = f"; did you mean {close}?" if close else "; `python -m app train --help` lists the training keys"
            raise UserError(f"{where}: unknown setting {b.key}{hint}")
        if b.value is None:
            continue
        start = _VALUE_START.match(raw)
        value = interpolation.expand(b.value, start.group(1) if start else "", environ, earlier, f"{where}: {b.key}")
        earlier[b.key] = value
        if value.strip():
            values[b.key] = value.strip()
    return values


def apply_dotenv(environ: MutableMapping[str, str], path: str | os.PathLike = ".env") -> dict[str, str]:
    """Put a `.env` file's settings under the real environment, as if exported (the environment wins),
    checked like every `.env` read: a line that doesn't parse or an unknown key is one error line."""
    dotenv = read_dotenv(path, environ) if os.path.exists(path) else {}
    for key, value in dotenv.items():
        if not settings.present(key, environ):  # unset or empty: the file's value applies
            environ[key] = value
    return dotenv
