"""Where an offline sweep lives and how its Optuna study is opened.

Storage (SWEEP_STORAGE): by default an Optuna journal file on the runs volume,
$WANDB_DIR/sweeps/<name>.journal. Optuna's JournalFileBackend is built for several processes sharing a
file system: every change is one appended line written under an O_EXCL lock file, and readers replay
the log, so the order of the log decides every race (two agents popping the same queued trial: the
first line wins). It needs no fcntl locks (unreliable on Docker Desktop file shares and NFS, which is
what SQLite depends on), and Optuna's RDBStorage on SQLite does not lock rows, so two agents can pop
the same trial there. For agents on several hosts: SWEEP_STORAGE=postgresql://user:pass@host/db
(RDBStorage; rows are locked FOR UPDATE). A journal is checked for damage before anything writes on it
(app.sweep.optuna.journal).

Mapping: grid -> GridSampler, random -> RandomSampler, bayes -> TPESampler, early_terminate hyperband
-> HyperbandPruner, metric.goal -> study direction.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import optuna

from app.errors import UserError
from app.sweep.optuna import journal, replay
from app.sweep.optuna.plan import Plan, redact
from app.sweep.spec import SweepSpec


def open_storage(url: str, *, write: bool = True):
    """The Optuna storage behind `url`. A journal file is scanned first: damage is one error line, and
    (when this process will write) a crashed append's partial last line is cut away under the lock.
    Every wait on a database is bounded (CONNECT_TIMEOUT_S, STATEMENT_TIMEOUT_S; see _wait): libpq's
    default is to wait for ever on a host that accepts and then says nothing."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # agents print their own one-line records

    if "://" in url:
        try:
            return _rdb_storage(url)
        except Exception as exc:  # sqlalchemy/psycopg2 errors: bad host, password, database
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"SWEEP_STORAGE={redact(url)}: cannot open the database ({redact(first)[:160]})") from None

    path = Path(url)
    if path.exists() and not path.is_file():
        raise UserError(f"sweep storage {str(path)[:120]!r} is not a file; set SWEEP_STORAGE to a journal file path")
    try:
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise UserError(f"no offline sweep storage at {str(path)[:120]!r}; has an agent run yet?")
        if path.is_file():
            note = journal.check(path, heal=write)
            if note:
                print(f"[offline-sweep] {note}", file=sys.stderr, flush=True)
        if write:
            # every agent start appends (Optuna's create-study), and each append creates the lock file
            # beside the journal: a read-only journal or volume is refused here, not mid-write
            with open(path, "ab"):
                pass
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=path.parent)
            os.close(fd)
            os.unlink(probe)
        return replay.JournalStorage(journal.SafeJournalBackend(str(path)))  # Optuna's, replaying faster
    except OSError as exc:
        also = "; `python -m app sweep-status` can still read it" if write and path.is_file() else ""
        raise UserError(f"sweep storage {str(path)[:120]!r} is not {'writable' if write else 'readable'} "
                        f"({exc.strerror or exc}){also}; check the runs volume or set SWEEP_STORAGE") from None


_handed: dict[str, tuple] = {}  # storage URL -> (a storage opened to check it, _identity(URL)); at most one


def hand_over(url: str, storage) -> None:
    """Keep `storage`, just opened to check it, for the next open of the same URL in this process (handed_over):
    a journal is replayed whole when it is opened, seconds at 20 000 trials."""
    _handed.clear()
    _handed[url] = (storage, _identity(url))


def handed_over(url: str):
    """The storage hand_over kept for `url` (once), None when there is none or its journal file was replaced
    since (repaired, removed and started again)."""
    storage, identity = _handed.pop(url, (None, None))
    return storage if storage is not None and identity == _identity(url) else None


def _identity(url: str):
    if "://" in url:
        return "database"
    try:
        st = os.stat(url)
    except OSError:
        return None
    return st.st_dev, st.st_ino


SCHEMA_LOCK = 0x6D6E6973  # PostgreSQL advisory lock key ("mnis") held while Optuna's tables are created
# a database that accepts the connection and then says nothing must not hold an agent for minutes
CONNECT_TIMEOUT_S = 10  # to connect and log in
STATEMENT_TIMEOUT_S = 60  # for one answer (server-side too); Optuna's statements take milliseconds


def _wait(conn) -> None:
    """psycopg2's wait callback: libpq waits in a Python select(), so SIGTERM/SIGINT raise here at any
    moment (a blocking libpq call retries its poll and never lets Python see the signal), and a silent
    server is given up on after CONNECT_TIMEOUT_S / STATEMENT_TIMEOUT_S (libpq's own connect_timeout does
    not apply to a connection driven this way)."""
    import select

    import psycopg2
    from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE, STATUS_SETUP

    connecting = conn.status == STATUS_SETUP
    limit = CONNECT_TIMEOUT_S if connecting else STATEMENT_TIMEOUT_S
    deadline = time.monotonic() + limit
    while True:
        state = conn.poll()
        if state == POLL_OK:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise psycopg2.OperationalError(f"no answer from the database within {limit} s "
                                            f"({'connecting' if connecting else 'waiting for a statement'})")
        if state == POLL_READ:
            select.select([conn.fileno()], [], [], left)
        elif state == POLL_WRITE:
            select.select([], [conn.fileno()], [], left)
        else:
            raise psycopg2.OperationalError(f"unexpected state {state} from the database connection")


def storage_problem(exc: BaseException) -> str | None:
    """One line saying how the sweep's storage failed under `exc`, None when `exc` is not the storage
    going silent or away (a bug, a refused write, a stop). A database: the driver's first line
    ("Connection refused", "server closed the connection unexpectedly", "no answer from the database
    within 60 s"); Optuna wraps it in its StorageInternalError, whose own text blames the data. A journal
    file: the system's word for an OSError met while reading or appending it ("No space left on device"
    on a full volume, "Read-only file system" on one remounted read-only)."""
    import sqlalchemy.exc

    seen: set[int] = set()
    journal_error = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError)):
            text = str(getattr(exc, "orig", None) or exc).strip()
            return redact(text.splitlines()[0] if text else type(exc).__name__)[:160]
        if isinstance(exc, OSError) and _raised_in_journal(exc):
            # the deepest is the cause: Optuna's lock, failing to take the lock file, fails again releasing it
            journal_error = (exc.strerror or type(exc).__name__)[:160]
        exc = exc.__cause__ or exc.__context__
    return journal_error


def _raised_in_journal(exc: BaseException) -> bool:
    """Whether `exc` came out of the journal file's code (ours in app.sweep.optuna.journal, or Optuna's)."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name == journal.__file__ or f"{os.sep}optuna{os.sep}storages{os.sep}journal{os.sep}" in name:
            return True
        tb = tb.tb_next
    return False


def storage_down(storage) -> str:
    """How a storage failing (storage_problem) is said: a database stops answering, a journal stops being written."""
    if isinstance(storage, optuna.storages.JournalStorage):
        return "the sweep journal cannot be written"
    return "the sweep database is not answering"


def _bounded_postgres() -> dict:
    """Engine arguments that bound every wait on PostgreSQL (see _wait); installs the wait callback."""
    import psycopg2.extensions

    psycopg2.extensions.set_wait_callback(_wait)
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S,
                             "options": f"-c statement_timeout={STATEMENT_TIMEOUT_S * 1000}"}}


def _rdb_storage(url: str):
    """Optuna's RDBStorage, its tables created by one agent at a time. Agents started together on a new
    database would each run CREATE TABLE, and PostgreSQL's catalog refuses all but the first with a
    unique violation (pg_type_typname_nsp_index): a session advisory lock makes the others wait, then
    find the tables there. The lock goes with the connection, whatever happens."""
    import sqlalchemy

    bounded = _bounded_postgres() if sqlalchemy.engine.make_url(url).get_backend_name() == "postgresql" else {}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **bounded)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True, **bounded})
    finally:
        engine.dispose()


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its end-of-grid `study.stop()`, which works only inside
    `study.optimize`: these agents use ask/tell and decide themselves when the sweep is over (they
    must also wait for trials running elsewhere)."""

    def after_trial(self, study, trial, state, values):
        pass


class DirectRDB(optuna.storages.BaseStorage):
    """An RDBStorage as it is, without the trial cache Optuna wraps it in (see study_storage); every call
    goes to the database."""

    def __init__(self, rdb):
        self._backend = rdb

    def __getattr__(self, name):
        return getattr(self._backend, name)


def _forward(name: str):
    def call(self, *args, **kwargs):
        return getattr(self._backend, name)(*args, **kwargs)
    return call


for _name in [n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_") and callable(getattr(optuna.storages.BaseStorage, n))]:
    setattr(DirectRDB, _name, _forward(_name))
DirectRDB.__abstractmethods__ = frozenset()


def study_storage(p: Plan, storage):
    """What an agent's study reads through. Optuna wraps an RDBStorage in a cache that loads every trial of
    the study on first use and keeps them all (tens of seconds and a gigabyte at 20 000 trials): worth it
    only where the sampler or pruner reads every trial anyway (bayes: TPE; grid: GridSampler; hyperband).
    Random search without early termination never does: its study asks the database directly, each
    question one filtered query (queued trials, one trial), and the agent's own ledger reads only what
    changed (app.sweep.optuna.trials.TrialView)."""
    if isinstance(storage, optuna.storages.RDBStorage) and p.spec.method == "random" and not p.spec.early_terminate:
        return DirectRDB(storage)
    return storage


def sampler(p: Plan):
    if p.spec.method == "grid":
        return GridSampler(p.space.grid_space(), seed=0)
    if p.spec.method == "random":
        return optuna.samplers.RandomSampler()
    return optuna.samplers.TPESampler()


def pruner(p: Plan):
    """W&B's hyperband settings as Optuna's HyperbandPruner; one resource unit = one epoch."""
    et = p.spec.early_terminate
    if not et:
        return optuna.pruners.NopPruner()
    epochs = p.space.constants.get("epochs")
    swept_epochs = any(d.name == "epochs" for d in p.space.dimensions)
    max_resource = et.get("max_iter") or ("auto" if swept_epochs else int(epochs or p.base.epochs))
    return optuna.pruners.HyperbandPruner(min_resource=et.get("min_iter", 1), max_resource=max_resource,
                                          reduction_factor=et.get("eta", 3))


def fingerprint(spec: SweepSpec) -> str:
    """What a sweep's study is bound to: changing any of these needs a new sweep name."""
    keys = ("method", "metric", "parameters", "early_terminate", "run_cap")
    return json.dumps({k: spec.raw.get(k) for k in keys}, sort_keys=True, default=str)


def open_study(p: Plan, storage=None):
    storage = storage if storage is not None else open_storage(p.storage_url)
    study = optuna.create_study(study_name=p.name, storage=storage, load_if_exists=True,
                                direction="maximize" if p.goal == "maximize" else "minimize",
                                sampler=sampler(p), pruner=pruner(p))
    stored = study.user_attrs.get("sweep_config")
    if stored is None:
        study.set_user_attr("sweep_config", fingerprint(p.spec))
        study.set_user_attr("method", p.spec.method)
        study.set_user_attr("metric", p.metric)
        study.set_user_attr("goal", p.goal)
        if p.grid_size:
            study.set_user_attr("grid_size", p.grid_size)
    elif stored != fingerprint(p.spec):
        raise UserError(f"sweep {p.name!r} in {redact(p.storage_url)} was started from a different config "
                        "(method, metric, parameters, early_terminate or run_cap changed); give the sweep a new "
                        "name: in the YAML, or remove that storage to start over")
    return study


def load_study(url: str, name: str, storage=None):
    """An existing study, for reading only (sweep-status, report): never creates or heals anything.
    `storage`: the one open_storage(url, write=False) gave, when several sweeps are read from it."""
    storage = storage if storage is not None else open_storage(url, write=False)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"sweep {name!r} is not in {redact(url)}") from None
