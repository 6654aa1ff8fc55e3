"""`$` in a `.env` value: one meaning for every reader of the file.

    value = interpolation.expand(raw, quote, environ, earlier)   # KEY's value as docker compose reads it

docker compose (env_file, the project's .env) expands `${VAR}`, `${VAR:-default}`, `$VAR` and `$$` in
unquoted and double-quoted values, from the environment first and then the file's earlier lines;
single-quoted values are literal. python-dotenv (`dotenv_values`, what a user's own script or notebook
reads the file with) expands only `${VAR}` and `${VAR:-default}`, in every value, from the earlier lines
first, and its `:-` takes the default only when VAR is unset, not when it is empty. Our readers (train, the
entrypoint, the Slurm export) used to keep `${HOME}` literal: a run wrote into a folder named `${HOME}`.

So a value is read as compose reads it where the two agree, and refused in one line where they don't
(`$VAR`, `$$`, single-quoted `${VAR}`, `${VAR:-default}` of an empty VAR, `\\$`, compose's other forms):
that file would mean one thing to compose and another to python-dotenv. A literal `$`: single quotes
around a value with no `${` in it (`'pa$word'`).
"""

from __future__ import annotations

import re
from typing import Mapping

from app.errors import UserError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# what follows a `$` in compose: $$, a braced reference (its content up to the first `}`), a bare name;
# any other `$` is kept as it is (compose keeps `$1`, `a $ b` and a trailing `$`)
_REFERENCE = re.compile(rf"\$(?:(\$)|\{{([^}}]*)\}}|({_NAME})|(\{{))")
_BRACED = re.compile(rf"({_NAME})(?::-([^$]*))?")  # ${VAR} or ${VAR:-default}; a default holding `$` is nested


class Unread(Exception):
    """A form of compose's we don't read (compose's other braced forms, a nested default, an open `${`)."""


def compose(value: str, environ: Mapping[str, str], earlier: Mapping[str, str]) -> str:
    """`value` (unquoted or double-quoted) as docker compose expands it."""
    def lookup(name: str) -> str | None:
        return environ[name] if name in environ else earlier.get(name)  # the environment wins, as in compose

    def one(m: re.Match[str]) -> str:
        dollar, braced, bare, opened = m.groups()
        if dollar:
            return "$"
        if bare:
            return lookup(bare) or ""
        if opened:  # `${` with no `}`: compose refuses the template
            raise Unread("${ without its }")
        ref = _BRACED.fullmatch(braced)
        if not ref:
            raise Unread(f"${{{braced}}}")
        name, default = ref.groups()
        found = lookup(name)
        if default is None:
            return found or ""  # an unset VAR is blank (compose also warns)
        return found or default  # `:-`: the default when VAR is unset or empty

    return _REFERENCE.sub(one, value)


def python_dotenv(value: str, environ: Mapping[str, str], earlier: Mapping[str, str]) -> str:
    """`value` as python-dotenv's `dotenv_values` expands it (its own code, so this is what it does)."""
    from dotenv.variables import parse_variables

    env = {**environ, **earlier}  # dotenv_values: override=True, the file's earlier lines win
    return "".join(atom.resolve(env) for atom in parse_variables(value))


def expand(value: str, quote: str, environ: Mapping[str, str], earlier: Mapping[str, str], where: str) -> str:
    """The value of a `.env` line (already unquoted; `quote` is `'`, `"` or "") with its `$` references
    expanded; a UserError naming `where` (FILE:LINE: KEY) when compose and python-dotenv would differ.
    `earlier`: the file's lines before this one, expanded."""
    if "$" not in value:
        return value
    dotenv = python_dotenv(value, environ, earlier)
    if quote == "'":
        composed = value  # compose takes single-quoted values literally
    else:
        try:
            if quote == '"' and "\\$" in value:  # compose's escaped dollar; python-dotenv keeps the backslash
                raise Unread("\\$")
            composed = compose(value, environ, earlier)
        except Unread as form:
            raise UserError(f"{where}: {form} is read differently by docker compose and python-dotenv: write "
                            "${VAR} or ${VAR:-default} (default without $)") from None
    if composed != dotenv:
        raise UserError(f"{where}={_cut(value)!r} is {_cut(composed)!r} to docker compose but {_cut(dotenv)!r} to "
                        "python-dotenv: write ${VAR} or ${VAR:-default} (not $VAR or $$), a literal $ in single quotes "
                        "without ${")
    return composed


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."
