"""What the report ranks a sweep's runs by: the sweep's own metric, goal, log-scale settings and the
attempts that died, read from the storage its agents used; where there is none, what is assumed and why.

    from app.runs import ranking
    sources = ranking.Sources.open(roots, storage)          # storage: --storage, else $SWEEP_STORAGE (app.settings)
    found = sources.definition("grid-lr", wandb_sweep=False)  # found.assumed is "" when read from the sweep

Looked up in order, the first that holds the sweep wins: the storage named by --storage or SWEEP_STORAGE
(a journal file or a postgresql:// database, as the agents were given it), then a journal copied along
with the runs (<runs folder>/sweeps/<name>.journal). Neither (a W&B sweep, whose definition stays on the
W&B server; runs of no sweep; an offline sweep whose storage was not named): the report ranks by
val_accuracy, maximize, and says so on the page with the reason. A storage that is named but cannot be
opened is one error line before any run is read; a database that does not answer is given up after
app.sweep.optuna.storage.CONNECT_TIMEOUT_S seconds. Everything is read-only: no study is created, no journal healed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from app import settings
from app.errors import UserError

DEFAULT_METRIC, DEFAULT_GOAL = "val_accuracy", "maximize"


@dataclass(frozen=True)
class Definition:
    metric: str
    goal: str
    died: list[dict] = field(default_factory=list)  # attempts the storage saw die, stop or fail
    log: dict[str, bool] = field(default_factory=dict)  # settings drawn on a log scale ({}: judge from values)
    trials: dict[str, dict] = field(default_factory=dict)  # run id -> {"trial": number, "seconds": s}, as sweep-status shows
    source: str = ""  # where it was read, in words ("" when assumed)
    assumed: str = ""  # why the metric and goal are the report's defaults ("" when read from the sweep)


def assumed(reason: str) -> Definition:
    return Definition(DEFAULT_METRIC, DEFAULT_GOAL, assumed=reason)


def journal_beside(roots: list[Path], name: str) -> Path | None:
    """A sweep's journal copied along with its runs: PATH may be the runs folder (WANDB_DIR) or its
    wandb/ folder, and the journal sits in sweeps/ beside wandb/."""
    return next((d / "sweeps" / f"{name}.journal" for root in roots for d in (root, root.parent)
                 if name and (d / "sweeps" / f"{name}.journal").is_file()), None)


@dataclass
class Sources:
    roots: list[Path]
    url: str = ""  # the named storage ("" when none was named)
    setting: str = ""  # what named it: --storage or SWEEP_STORAGE
    storage: Any = None  # the Optuna storage, opened once, read-only
    names: frozenset[str] = frozenset()  # the sweeps it holds

    @classmethod
    def open(cls, roots: list[Path], storage: str | None = None,
             environ: Mapping[str, str] | None = None) -> "Sources":
        """The storage named by `storage` (the --storage option), else by SWEEP_STORAGE, opened for reading."""
        from app.sweep.optuna.plan import storage_url
        from app.sweep.optuna.storage import open_storage

        if storage is not None and not storage.strip():
            raise UserError("--storage is empty: give the sweep's journal file or its postgresql://user:password@host/db URL")
        given = storage.strip() if storage else settings.get("SWEEP_STORAGE", environ)
        if not given:
            return cls(roots)
        url = storage_url({"SWEEP_STORAGE": given}, "-")  # checks the scheme; psycopg2 for postgresql://
        opened = open_storage(url, write=False)
        try:
            names = frozenset(s.study_name for s in opened.get_all_studies())
        except Exception as exc:  # sqlalchemy: a query refused or timed out after connecting
            raise UserError(f"{'--storage' if storage else 'SWEEP_STORAGE'}={_redact(url)}: cannot list its sweeps "
                            f"({_first_line(exc)})") from None
        return cls(roots, url, "--storage" if storage else "SWEEP_STORAGE", opened, names)

    def definition(self, name: str, wandb_sweep: bool = False) -> Definition:
        """The sweep `name`'s definition, or the report's defaults with the reason in words."""
        from app.sweep.optuna import status
        from app.sweep.optuna.storage import load_study
        from app.sweep.optuna.trials import trial_rows

        if wandb_sweep:
            return assumed("a W&B sweep keeps its metric and goal on the W&B server, not in its offline runs")
        if not name:
            return assumed("these runs belong to no sweep")
        if name in self.names:
            try:
                study = load_study(self.url, name, self.storage)
                found = status.summarize(study)
                trials = trial_numbers(trial_rows(study))
            except Exception as exc:  # a query refused or timed out: one line, not a traceback
                raise UserError(f"{self.setting}={_redact(self.url)}: cannot read sweep {name!r} ({_first_line(exc)})") from None
            return Definition(found.metric, found.goal, found.unfinished, found.log, trials,
                              f"its storage {_redact(self.url)}")
        journal = journal_beside(self.roots, name)
        if journal is not None:
            try:
                study = load_study(str(journal), name)
            except UserError as exc:  # damaged, or another sweep's: the runs still make a report
                return assumed(f"its journal {journal} could not be read ({exc})")
            found = status.summarize(study)
            return Definition(found.metric, found.goal, found.unfinished, found.log, trial_numbers(trial_rows(study)),
                              f"its journal {journal}")
        where = (f"not in {self.setting}={_redact(self.url)}" if self.url else
                 "in no storage named (no --storage given, SWEEP_STORAGE unset)")
        return assumed(f"sweep {name!r} is {where} and no sweeps/{name}.journal is beside the runs; "
                       "pass --storage with the storage its agents used")


def trial_numbers(rows: list[dict]) -> dict[str, dict]:
    """Run id -> the trial number and seconds sweep-status shows for it: of a run tried more than once
    (a retry resumes the same W&B run), the attempt that finished, else the last one."""
    out: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["trial"]):
        done = row["state"] in ("COMPLETE", "PRUNED", "DIVERGED")
        if row["run"] and (done or not out.get(row["run"], {}).get("done")):
            out[row["run"]] = {"trial": row["trial"], "seconds": row["seconds"], "done": done}
    return out


def _redact(url: str) -> str:
    from app.sweep.optuna.plan import redact

    return redact(url)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return _redact(text.splitlines()[0] if text else type(exc).__name__)[:160]
