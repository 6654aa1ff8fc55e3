"""How a recorded value reads, wherever runs and trials are shown (sweep-status, the report, its charts).

    from app import display
    display.number(float("nan"))   # None: a diverged run's metric is no number to rank or plot
    display.text(0.0123456)        # '0.01235'; display.text([16, 32]) -> '16,32'
    display.cell(None)             # '-': a table's empty cell

Here, below both the sweep wings and the report, so that each of them shows a value the same way.
"""

from __future__ import annotations

import math
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
