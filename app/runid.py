"""The run id rule: a run id names a folder (OUTPUT_DIR/<id>, the W&B run folder), so it must be one
safe path component as well as an id W&B accepts.

    runid.check(value, "WANDB_RUN_ID")   # the value, or a UserError naming where it came from

W&B refuses an id with any of `:;,#?/'` or surrounding whitespace; a path needs no separator, no `.`
or `..`, and a name the file system takes (255 bytes, less W&B's `offline-run-YYYYMMDD_HHMMSS-` prefix).
The rule is narrower than both: ASCII letters, digits, `-`, `_` and `.`, starting with a letter or a
digit (no hidden folder, no option-like `-x`), at most 64 characters. The ids W&B and the offline
sweep make (8 lower-case letters and digits) always pass.
"""

from __future__ import annotations

import re

from app.errors import UserError

MAX_LENGTH = 64
_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def valid(value: str) -> bool:
    return len(value) <= MAX_LENGTH and _RULE.fullmatch(value) is not None


def check(value: str, source: str) -> str:
    """`value` when it is a usable run id; else one line naming `source` (the variable it came from)."""
    if valid(value):
        return value
    shown = repr(value if len(value) <= 40 else value[:40] + "...")
    raise UserError(f"{source}={shown} is not a usable run id: 1 to {MAX_LENGTH} ASCII letters, digits, '-', '_' "
                    "or '.', starting with a letter or digit (it names the run's folder under OUTPUT_DIR)")
