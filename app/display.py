"""How a recorded value reads, wherever runs and trials are shown (sweep-status, the report, its charts).

    from app import display
    display.number(float("nan"))   # None: a diverged run's metric is no number to rank or plot
    display.text(0.0123456)        # '0.01235'; display.text([16, 32]) -> '16,32'
    display.cell(None)             # '-': a table's empty cell
    display.retrain_command(config, ["learning_rate"])   # the `python -m app train ...` that repeats a run

Here, below both the sweep wings and the report, so that each of them shows a value the same way.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Any, Mapping

from app.config import KEYS


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


NOT_RETRAIN = ("data_dir", "output_dir")  # where things live on the host that trained: this host has its own
# which device trains and how fast it goes: the host's (its .env), not the run's. A run that trained on a CPU
# host under device=auto, cuda_graph=true would otherwise be "repeated" with those on a GPU host. Kept when swept.
DEVICE_BOUND = ("device", "cuda_graph", "compile", "channels_last", "gpu_memory_fraction")
MAX_VALUE_CHARS = 200  # a recorded setting longer than this is no setting `train` accepts: no command is shown


def flag_text(v: Any) -> str:
    """A recorded value as `train` reads it back from --key=value: true/false, 16,32, every digit of a float."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else repr(v) if isinstance(v, float) else str(v)


def ran_on(device: Any, config: Mapping[str, Any]) -> str | None:
    """Which device a run trained on and its device settings, with the flags that repeat it on the same kind
    of device (retrain_command leaves them to the host). None where the run recorded no device."""
    if not isinstance(device, str) or not device:
        return None
    pinned = " ".join(f"--{k}={flag_text(config[k])}" for k in DEVICE_BOUND if k in config and k != "device")
    return (f"It trained on {device} with {pinned or 'the default device settings'}; to repeat it on the same "
            f"kind of device add --device={device.split(':')[0]}" + (f" {pinned}" if pinned else "") + ".")


def retrain_command(config: dict, first: list[str], width: int = 100) -> str | None:
    """`python -m app train --key=value ...` with every training setting the run recorded (the swept ones
    first, on the first line), so .env or the environment on this host cannot change what is trained
    (but not the settings that pick and tune the device, DEVICE_BOUND, unless swept: those are the host's);
    the rest follow on shell continuation lines of about `width` characters, so that a browser never
    breaks a flag in two and the text still pastes into a shell as one command. None when a recorded
    value is too long to be one (a damaged or hand-made log)."""
    swept = [k for k in first if k in KEYS]
    lines = [["python", "-m", "app", "train"]]
    for k in swept + [k for k in KEYS if k not in swept]:
        if k in config and k not in NOT_RETRAIN and (k in swept or k not in DEVICE_BOUND):
            v = config[k]
            text = flag_text(v)
            if len(text) > MAX_VALUE_CHARS:
                return None
            flag = shell_word(f"--{k}={text}")
            if k not in swept and (len(lines) == 1 or len(" ".join(lines[-1] + [flag])) > width):
                lines.append([])
            lines[-1].append(flag)
    return " \\\n    ".join(" ".join(line) for line in lines)
