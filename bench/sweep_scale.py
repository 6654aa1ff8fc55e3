"""What a trial, an agent's start and `sweep-status` cost as an offline sweep grows.

    .venv/bin/python bench/sweep_scale.py                          # 0, 1 000, 5 000, 20 000 trials; journal + PostgreSQL
    .venv/bin/python bench/sweep_scale.py --sizes 0,100000 --storages journal      # the 100 000-trial row
    .venv/bin/python bench/sweep_scale.py --code /tmp/before       # the same, measured on another checkout
    .venv/bin/python bench/sweep_scale.py --sizes 0,50 --trials 2 --json scale.json   # the CI smoke size

For every size it writes a synthetic random sweep of that many COMPLETE trials in Optuna's own formats:
the trials are made with Optuna's own ask/suggest/set-attribute/tell calls (what an agent's trial writes:
its params, heartbeats, key, run id, agent, values, run folder, value) on a journal held in memory, and
then written at once as a journal file, or into Optuna's PostgreSQL tables in a few bulk statements. Then
it measures, on that sweep, with the package's own commands (`--code`: the checkout measured):
  start      an agent process (`python -m app offline-agent --count TRIALS`) from its launch to its first
             trial's train(): imports, the storage opened and replayed, the study, the first ask
  trial      each further trial in that agent: from one trial's end to the next one's (total), and the
             agent's own part of it (`agent`: the time between train() calls + the model artifact's
             phase, where the sweep's best alias is decided) - training itself does not grow with the sweep
  peak RSS   of that agent process (its whole life; VmHWM: getrusage's figure keeps this script's own peak
             across fork and exec), and of one that opens the sweep as an agent does and
             takes its first look at the trials, training nothing (the sweep's own share, without the
             run-to-run spread of training's memory)
  status     `python -m app sweep-status` on the sweep (the default output), wall time; run twice: the first
             look at a new journal replays it whole and writes its snapshot (its own column), the second is
             what every later process pays (the snapshot, then the lines after it)
The trial trained is the same tiny one every time (bench/trials.py's: 1 epoch on 120 images, W&B offline).
PostgreSQL: `--postgres URL`, else a throwaway PostgreSQL 15 on loopback (tests/cluster.py's, as the
tests start it). Results and how they were measured: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path[1:1] = [str(REPO), str(REPO / "bench")]
from bench import BenchError, prepare_data  # noqa: E402  (the benchmarks' one data set-up)
from trials import CHILD, TRIAL, trial_phases  # noqa: E402  (the child that records train()'s phases)

SWEEP = """name: {name}
method: random
metric:
  name: val_accuracy
  goal: maximize
parameters:
  learning_rate:
    distribution: log_uniform_values
    min: 0.0003
    max: 0.03
  batch_size:
    values: [32, 64, 128, 256]
  kernels:
    values: [[8, 16], [16, 32], [32, 64]]
  seed:
    values: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""
STORAGES = ("journal", "postgresql")


# --------------------------------------------------------------------------------------------
# Synthetic sweeps in Optuna's formats
# --------------------------------------------------------------------------------------------

class MemoryJournal:
    """An Optuna journal backend in memory: the same log records a journal file holds, written at once."""

    def __init__(self):
        self.logs: list[dict[str, Any]] = []

    def read_logs(self, log_number_from: int):
        return self.logs[log_number_from:]

    def append_logs(self, logs):
        self.logs.extend(logs)


def sweep_plan(config: Path, storage_url: str, environ: dict[str, str]):
    from app.sweep.optuna.plan import plan

    return plan({**environ, "SWEEP_CONFIG": str(config), "SWEEP_STORAGE": storage_url})


def synthetic_study(p, n: int, seed: int = 0):
    """A study of `n` COMPLETE trials, each written as an agent writes one (app.sweep.optuna.trial): params,
    heartbeats, key, run id, agent, values, run folder, value; in a journal held in memory. Through Optuna's
    storage calls (study.ask() looks for queued trials among all of them: quadratic at 100 000).
    Returns (study, its MemoryJournal)."""
    import random

    import optuna
    from optuna.trial import TrialState

    from app.sweep.optuna.storage import open_study

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    backend = MemoryJournal()
    storage = optuna.storages.JournalStorage(backend)
    study = open_study(p, storage)
    sid = study._study_id
    rng = random.Random(seed)
    dist = {}
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for i in range(n):
        draw = probe.ask()  # in memory: the params and distributions the agent's suggest() makes
        params = {d.name: d.suggest(draw) for d in p.space.dimensions}
        dist = draw.distributions
        probe.tell(draw, state=TrialState.FAIL)
        if i % 100 == 99:  # its ask() looks through all its trials: kept short
            probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed + i))
        tid = storage.create_new_trial(sid)
        for name, value in params.items():
            storage.set_trial_param(tid, name, dist[name].to_internal_repr(value), dist[name])
        storage.set_trial_system_attr(tid, "heartbeat", time.time())
        storage.set_trial_system_attr(tid, "sweep_key", f"trial-{i}")
        run_id = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        storage.set_trial_user_attr(tid, "run_id", run_id)
        storage.set_trial_user_attr(tid, "agent", f"bench-host:{1000 + i % 4}")
        storage.set_trial_user_attr(tid, "values", p.space.values(params))
        storage.set_trial_system_attr(tid, "heartbeat", time.time())
        storage.set_trial_user_attr(tid, "run_folder", f"wandb/offline-run-20260101_000000-{run_id}")
        storage.set_trial_state_values(tid, TrialState.COMPLETE, [0.80 + 0.1 * rng.random()])
    return study, backend


def write_journal(p, n: int, path: Path) -> None:
    from optuna.storages.journal import JournalFileBackend

    _, backend = synthetic_study(p, n)
    if path.exists():
        path.unlink()
    JournalFileBackend(str(path)).append_logs(backend.logs)  # one append under the file's lock


def write_postgres(p, n: int, url: str) -> None:
    """The same trials in Optuna's own tables (its RDBStorage schema), inserted in bulk: one statement per
    table instead of Optuna's transaction per attribute."""
    import optuna
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    from app.sweep.optuna.storage import open_study

    study, _ = synthetic_study(p, n)
    storage = optuna.storages.RDBStorage(p.storage_url)  # postgresql+psycopg2://, as the agents open it
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=p.name, storage=storage)
    sid = open_study(p, storage)._study_id
    trials = study.get_trials(deepcopy=False)
    engine = storage.engine
    if not trials:
        return
    with engine.begin() as conn:
        conn.execute(models.TrialModel.__table__.insert(), [
            {"number": t.number, "study_id": sid, "state": TrialState.COMPLETE,
             "datetime_start": _utc(t.datetime_start), "datetime_complete": _utc(t.datetime_complete)}
            for t in trials])
        ids = dict(conn.execute(sqlalchemy.text("SELECT number, trial_id FROM trials WHERE study_id = :s"), {"s": sid}).all())
        conn.execute(models.TrialParamModel.__table__.insert(), [
            {"trial_id": ids[t.number], "param_name": k, "distribution_json":
             optuna.distributions.distribution_to_json(t.distributions[k]),
             "param_value": t.distributions[k].to_internal_repr(v)} for t in trials for k, v in t.params.items()])
        conn.execute(models.TrialValueModel.__table__.insert(), [
            {"trial_id": ids[t.number], "objective": 0, "value": t.value,
             "value_type": models.TrialValueModel.TrialValueType.FINITE} for t in trials])
        conn.execute(models.TrialUserAttributeModel.__table__.insert(), [
            {"trial_id": ids[t.number], "key": k, "value_json": json.dumps(v)} for t in trials for k, v in t.user_attrs.items()])
        conn.execute(models.TrialSystemAttributeModel.__table__.insert(), [
            {"trial_id": ids[t.number], "key": k, "value_json": json.dumps(v)} for t in trials for k, v in t.system_attrs.items()])
    engine.dispose()


def _utc(moment: datetime.datetime | None) -> datetime.datetime | None:
    """As RDBStorage stores a datetime: naive UTC."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

def run_agent(code: Path, config: Path, url: str, trials: int, environ: dict[str, str], work: Path, log: Path) -> dict[str, Any]:
    """One agent process of `trials` trials on the sweep: its start, its trials' phases, its peak RSS."""
    out = work / f"marks-{time.monotonic_ns()}.json"
    env = {**environ, "PYTHONPATH": str(code)}
    with open(log, "ab") as stream:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "trials.py"), CHILD, str(out), "app", "offline-agent",
                                 "--config", str(config), "--storage", url, "--count", str(trials)],
                                cwd=code, env=env, stdout=stream, stderr=subprocess.STDOUT)
        proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"the agent exited {proc.returncode}; its output is in {log}")
    got = json.loads(out.read_text())
    phases = trial_phases([tuple(m) for m in got["marks"]], t0)
    if len(phases) != trials:
        raise BenchError(f"the agent ran {len(phases)} of {trials} trials; its output is in {log}")
    further = phases[1:]
    return {"start": phases[0]["start"],
            "trial": [sum(t.values()) for t in further],
            "agent": [t["start"] + t.get("artifact", 0.0) for t in further],
            "peak_rss_mb": got["peak_rss_kb"] / 1024, "phases": phases}


MEMORY = """
import os
from app.sweep.optuna.agent import Agent
from app.sweep.optuna.plan import plan
agent = Agent(plan(os.environ), os.environ)
agent.ledger()
agent.say_best()
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def run_memory(code: Path, config: Path, url: str, environ: dict[str, str]) -> float:
    """An agent's memory for the sweep alone: the peak RSS (MB) of a process that opens the sweep as an agent
    does and takes its first look at the trials and its best, with no trial trained (training's own memory
    varies by more than the sweep's from one run to the next)."""
    proc = subprocess.run([sys.executable, "-c", MEMORY], cwd=code, capture_output=True, text=True, timeout=900,
                          env={**environ, "PYTHONPATH": str(code), "SWEEP_CONFIG": str(config), "SWEEP_STORAGE": url})
    if proc.returncode != 0:
        raise BenchError(f"the memory probe exited {proc.returncode}: {proc.stderr[-500:]}")
    return int(proc.stdout.split()[-1]) / 1024


def run_status(code: Path, url: str, name: str, environ: dict[str, str], extra: list[str]) -> tuple[float, int]:
    """`python -m app sweep-status` on the sweep: (seconds, bytes printed)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "app", "sweep-status", "--storage", url, "--name", name, *extra],
                          cwd=code, env={**environ, "PYTHONPATH": str(code)}, capture_output=True, timeout=900)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"sweep-status exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return seconds, len(proc.stdout)


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    sys.path.insert(0, str(REPO / "tests"))
    from cluster import postgres_server

    with postgres_server() as started:
        yield started


def measure(args, work: Path, environ: dict[str, str], pg_url: str | None) -> list[dict[str, Any]]:
    rows = []
    code = Path(args.code).resolve()
    log = work / "agents.log"
    for storage in args.storages:
        for n in args.sizes:
            name = f"scale-{storage[:2]}-{n}"
            config = work / f"{name}.yaml"
            config.write_text(SWEEP.format(name=name))
            url = str(work / f"{name}.journal") if storage == "journal" else pg_url
            p = sweep_plan(config, url, environ)
            t0 = time.perf_counter()
            (write_journal(p, n, Path(url)) if storage == "journal" else write_postgres(p, n, url))
            made = time.perf_counter() - t0
            # the first look at a new journal replays it whole and writes its snapshot (again after every
            # snapshot.EVERY new lines); every later process reads the snapshot and the lines after it
            first_s, _ = run_status(code, url, name, environ, [])
            status_s, status_bytes = run_status(code, url, name, environ, [])
            agent = run_agent(code, config, url, args.trials, environ, work, log)
            row = {"storage": storage, "trials": n, "written_s": made, "first_status_s": first_s, "status_s": status_s,
                   "status_bytes": status_bytes, "sweep_rss_mb": run_memory(code, config, url, environ), **agent}
            rows.append(row)
            print(f"{storage} {n}: written in {made:.1f} s; start {row['start']:.2f} s, trial "
                  f"{statistics.median(row['trial']):.2f} s (agent's part {statistics.median(row['agent']):.3f} s), "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB (without training {row['sweep_rss_mb']:.0f}), sweep-status {status_s:.2f} s "
                  f"(the first {first_s:.2f} s)", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Per storage and size, each figure and its difference from the empty sweep; then the growth per 1 000."""
    lines = ["| storage | trials | a further trial: total / the agent's part (s) | agent start (s) | sweep-status (s) "
             "| the first sweep-status (s) | agent peak RSS (MB) | the same without training (MB) |",
             "|---|---:|---|---|---|---|---|---|"]
    for storage in dict.fromkeys(r["storage"] for r in rows):
        mine = sorted((r for r in rows if r["storage"] == storage), key=lambda r: r["trials"])
        base = mine[0]

        def cell(r, key, fmt="{:.2f}"):
            v = statistics.median(r[key]) if isinstance(r[key], list) else r[key]
            b = statistics.median(base[key]) if isinstance(base[key], list) else base[key]
            return fmt.format(v) + ("" if r is base else f" ({'+' if v >= b else '-'}{fmt.format(abs(v - b))})")

        for r in mine:
            lines.append(f"| {storage} | {r['trials']:,} | {cell(r, 'trial')} / {cell(r, 'agent', '{:.3f}')} | "
                         f"{cell(r, 'start')} | {cell(r, 'status_s')} | {cell(r, 'first_status_s')} | "
                         f"{cell(r, 'peak_rss_mb', '{:.0f}')} | "
                         f"{cell(r, 'sweep_rss_mb', '{:.0f}')} |")
        top = mine[-1]
        if top is not base and top["trials"] > base["trials"]:
            k = (top["trials"] - base["trials"]) / 1000

            def per(key):
                v = statistics.median(top[key]) if isinstance(top[key], list) else top[key]
                b = statistics.median(base[key]) if isinstance(base[key], list) else base[key]
                return (v - b) / k

            lines.append(f"| {storage} | per 1,000 | {per('trial'):+.3f} / {per('agent'):+.4f} | {per('start'):+.3f} | "
                         f"{per('status_s'):+.3f} | {per('first_status_s'):+.3f} | {per('peak_rss_mb'):+.1f} | "
                         f"{per('sweep_rss_mb'):+.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,1000,5000,20000", help="completed trials per sweep, comma-separated")
    parser.add_argument("--storages", default=",".join(STORAGES), help="journal, postgresql or both")
    parser.add_argument("--trials", type=int, default=4, help="trials per agent (the first gives its start; >= 2)")
    parser.add_argument("--code", default=str(REPO), help="the checkout whose `python -m app` is measured")
    parser.add_argument("--postgres", help="a PostgreSQL URL to write the sweeps in (default: a throwaway server)")
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="the four Fashion-MNIST .gz files")
    parser.add_argument("--data-dir", help="a data root with them already unpacked (skips --source)")
    parser.add_argument("--work-dir", help="keep the sweeps, runs and logs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: comma-separated whole numbers")
    args.storages = [s.strip() for s in args.storages.split(",")]
    if any(s not in STORAGES for s in args.storages):
        parser.error(f"--storages {','.join(args.storages)}: journal, postgresql or both")
    if args.trials < 2:
        parser.error("--trials: at least 2 (the first trial's time is the agent's start)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-")))
        work.mkdir(parents=True, exist_ok=True)
        try:
            data_dir = prepare_data(args, work)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SWEEP_"))}
        environ = {**keep, **TRIAL, "DATA_DIR": str(data_dir), "OUTPUT_DIR": str(work / "outputs"), "DEVICE": "cpu",
                   "WANDB_MODE": "offline", "WANDB_DIR": str(work / "runs"), "WANDB_PROJECT": "scale",
                   "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "ALLOW_CPU": "true"}
        pg_url = stack.enter_context(postgres(args.postgres)) if "postgresql" in args.storages else None
        try:
            rows = measure(args, work, environ, pg_url)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"code": args.code, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
