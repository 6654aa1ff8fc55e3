"""How a recorded value reads, wherever runs and trials are shown (sweep-status, the report, its charts).

    from app import display
    display.number(float("nan"))   # None: a diverged run's metric is no number to rank or plot
    display.text(0.0123456)        # '0.01235'; display.text([16, 32]) -> '16,32'
    display.cell(None)             # '-': a table's empty cell

Here, below both the sweep wings and the report, so that each of them shows a value the same way.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Any


def number(v: Any) -> float | None:
    """v as a finite float; None for NaN/inf (a diverged run), bools, strings and missing values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def text(v: Any, digits: str = ".4g") -> str:
    """A value in a line of text: a float to `digits` (a format spec), a list as 16,32, else str(v)."""
    if isinstance(v, float):
        return format(v, digits)
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def cell(v: Any, digits: str = ".4g") -> str:
    """A value in a table: as `text`, with a missing one (None) as '-'."""
    return "-" if v is None else text(v, digits)


# Characters that change how the text around them is drawn without being seen themselves: the bidi
# controls (a right-to-left override makes `--lr=0.1 ; rm` read as something else) and the other
# format and control characters. Recorded names and values come from run logs made elsewhere.
_HIDDEN = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def visible(text: str) -> str:
    """`text` with each invisible control character shown as its escape (\\u202e), so it can't disguise
    what is around it on a page or in a terminal."""
    return _HIDDEN.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def shell_word(text: str) -> str:
    """`text` as one shell word that pastes safely and reads as what it is: shlex-quoted, or in bash's
    $'...' form with \\uXXXX escapes when it holds an invisible control character."""
    if not _HIDDEN.search(text):
        return shlex.quote(text)
    body = text.replace("\\", "\\\\").replace("'", "\\'")
    return "$'" + _HIDDEN.sub(lambda m: f"\\u{ord(m.group(0)):04x}", body) + "'"
