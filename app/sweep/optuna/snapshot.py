"""A journal's replayed state kept beside it (`<journal>.snapshot`), so opening a large journal reads only what is new.

Every process that opens a journal (each agent's start, each `sweep-status`) replays it line by line, 13 lines a
trial here: at 20 000 trials that is ~2 s, most of it parsing JSON. The snapshot holds the replay's result after a
whole number of lines (studies, trials, the line count and byte offset reached) with the SHA-256 of the journal's
bytes up to that offset, so it stands only for the journal it was made from: a repaired, replaced or edited
journal no longer matches and is replayed whole. It is JSON, never pickle (Optuna's own snapshot is a pickle, and
unpickling a file from a shared volume can run code): a header line (format, Optuna's version, the time zone the
dates were read in, the body's size and SHA-256), then the body. It is a cache: one that is missing, too large
(bigger than the journal part it stands for), from another version or time zone, or not matching is ignored and the
journal replayed whole; the journal stays the only record. Whoever replays EVERY lines or more past it writes a
new one, whole or not at all; a volume that refuses it (read-only, full) only costs the next reader the replay.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution, distribution_to_json, json_to_distribution
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from app import places
from app.errors import UserError

FORMAT = 1
EVERY = 10_000  # lines replayed past the snapshot before a new one is written (~0.1 s of replay; ~770 trials here)
SLACK = 1 << 20  # a snapshot is smaller than the journal part it stands for (no worker ids, no repeated lines)
CHUNK = 1 << 20


def path_of(journal: str | Path) -> Path:
    return Path(f"{journal}.snapshot")


def _zone() -> list:
    """How this process turns the journal's UTC times into Optuna's naive local ones: another zone reads them
    differently, so a snapshot is only used in the zone it was written in."""
    return [time.timezone, time.altzone, time.daylight, list(time.tzname)]


def _digest(journal: str | Path, offset: int) -> str | None:
    """SHA-256 of the journal's first `offset` bytes; None when it is shorter (replaced by a smaller one)."""
    h, left = hashlib.sha256(), offset
    with open(journal, "rb") as f:
        while left:
            block = f.read(min(CHUNK, left))
            if not block:
                return None
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _when(d: datetime | None) -> str | None:
    return None if d is None else d.isoformat()


def _body(replay, lines: int, offset: int, digest: str) -> dict:
    texts: dict[int, str] = {}  # id(distribution) -> its JSON: trials share a handful of objects
    table: dict[str, int] = {}

    def index(d) -> int:
        text = texts.get(id(d))
        if text is None:
            text = texts[id(d)] = distribution_to_json(d)
        return table.setdefault(text, len(table))

    internals: dict[tuple, float] = {}

    def internal(d, value) -> float:
        """The value as the journal holds it; refused (ValueError: no snapshot) when it would not read back as
        itself, e.g. a choice equal to an earlier one (1 and True)."""
        if type(value) is float and type(d) is FloatDistribution:
            return value  # Optuna's float param is its own internal value
        key = (id(d), type(value), value)
        found = internals.get(key)
        if found is None:
            found = internals[key] = d.to_internal_repr(value)
            back = d.to_external_repr(found)
            if type(back) is not type(value) or back != value:
                raise ValueError("a param value does not read back as itself")
        return found

    trials = []
    for t in replay._trials.values():
        params = {}
        for name, value in t.params.items():
            d = t.distributions[name]
            params[name] = [index(d), internal(d, value)]
        trials.append([t._trial_id, t.number, t.state.value, t._values, _when(t.datetime_start),
                       _when(t.datetime_complete), params, t.user_attrs, t.system_attrs,
                       {str(k): v for k, v in t.intermediate_values.items()}])
    return {
        "lines": lines, "offset": offset, "sha256": digest, "next_study_id": replay._next_study_id,
        "studies": [[s._study_id, s.study_name, [d.value for d in s.directions], s.user_attrs, s.system_attrs]
                    for s in replay._studies.values()],
        "study_trials": [[k, v] for k, v in replay._study_id_to_trial_ids.items()],
        "distributions": list(table),
        "trials": trials,
    }


def write(journal: str | Path, replay, lines: int, offset: int) -> bool:
    """Write the snapshot of `replay` (its state after the journal's first `lines` lines, `offset` bytes). False
    when it could not be made or written; nothing half-written is ever left under its name."""
    try:
        digest = _digest(journal, offset)
        if digest is None:
            return False
        body = json.dumps(_body(replay, lines, offset, digest), separators=(",", ":"))  # ASCII: \u escapes
        header = {"format": FORMAT, "optuna": optuna.__version__, "zone": _zone(), "size": len(body),
                  "sha256": hashlib.sha256(body.encode()).hexdigest()}
        places.write_text(path_of(journal), json.dumps(header) + "\n" + body, "sweep snapshot")
        return True
    except (OSError, UserError, ValueError, TypeError):  # a refusing volume, a value JSON cannot hold: none this time
        return False


def read(journal: str | Path) -> dict | None:
    """The snapshot's body when it stands for the journal as it is now, else None (replay it whole)."""
    target = path_of(journal)
    try:
        with open(target, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > os.stat(journal).st_size + SLACK:
                return _ignored(target, "larger than the journal itself")
            header = json.loads(f.readline(4096))
            if not isinstance(header, dict) or "format" not in header:
                return _ignored(target, "damaged (no header)")
            if header["format"] != FORMAT or header.get("optuna") != optuna.__version__ or header.get("zone") != _zone():
                return None  # another version's or zone's: the next writer replaces it
            blob = f.read()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        return _ignored(target, type(exc).__name__)
    if len(blob) != header.get("size") or hashlib.sha256(blob).hexdigest() != header.get("sha256"):
        return _ignored(target, "damaged (its checksum does not match)")
    try:
        body = json.loads(blob)
        offset = body["offset"]
        if type(offset) is not int or offset < 0 or _digest(journal, offset) != body["sha256"]:
            return None  # the journal was repaired or replaced since: its bytes differ
    except (OSError, ValueError, RecursionError, TypeError, KeyError) as exc:
        return _ignored(target, type(exc).__name__)
    return body


def _ignored(target: Path, why: str) -> None:
    print(f"[offline-sweep] ignoring {target.name}: {why}; replaying the journal instead (it is only a cache)",
          file=sys.stderr, flush=True)
    return None


def restore(replay, body: dict) -> bool:
    """Fill a fresh Replay from `body`; False (and `replay` left unusable) when the body is not well formed."""
    try:
        parsed = {text: json_to_distribution(text) for text in body["distributions"]}
        dists = list(parsed.values())
        replay._parsed.update(parsed)  # later lines with the same JSON get the same object, as a replay does
        for study_id, name, directions, user_attrs, system_attrs in body["studies"]:
            replay._studies[int(study_id)] = FrozenStudy(
                study_name=str(name), direction=None, user_attrs=dict(user_attrs), system_attrs=dict(system_attrs),
                study_id=int(study_id), directions=[StudyDirection(d) for d in directions])
        for study_id, trial_ids in body["study_trials"]:
            replay._study_id_to_trial_ids[int(study_id)] = [int(t) for t in trial_ids]
            for t in trial_ids:
                replay._trial_id_to_study_id[int(t)] = int(study_id)
        for (trial_id, number, state, values, start, complete, params, user_attrs, system_attrs,
             intermediate) in body["trials"]:
            distributions = {name: dists[i] for name, (i, _) in params.items()}
            replay._trials[int(trial_id)] = FrozenTrial(
                number=int(number), state=TrialState(state), value=None,
                values=None if values is None else list(values),
                datetime_start=None if start is None else datetime.fromisoformat(start),
                datetime_complete=None if complete is None else datetime.fromisoformat(complete),
                params={name: distributions[name].to_external_repr(internal) for name, (_, internal) in params.items()},
                distributions=distributions, user_attrs=dict(user_attrs), system_attrs=dict(system_attrs),
                intermediate_values={int(k): v for k, v in intermediate.items()}, trial_id=int(trial_id))
        replay._next_study_id = int(body["next_study_id"])
        if set(replay._trial_id_to_study_id) != set(replay._trials):
            return False
        replay.log_number_read = int(body["lines"])
        return True
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False
