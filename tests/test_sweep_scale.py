"""An offline agent's work per trial does not grow with its sweep: counted on real Optuna storages (a journal
file, PostgreSQL 15) by wrapping their read calls, and the sweep's best alias decided from what the agent
holds, other agents' results included. Plus bench/sweep_scale.py on a tiny size (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from cluster import postgres_server
from conftest import REPO, clean_env
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from app import artifact
from app.sweep.optuna import agent as osa
from app.sweep.optuna import status as oss
from app.sweep.optuna import trial as ost
from app.sweep.optuna.plan import plan
from app.sweep.optuna.storage import open_storage, open_study

SWEEP = """name: {name}
method: random
metric:
  name: val_accuracy
  goal: maximize
parameters:
  learning_rate:
    distribution: uniform
    min: 0.001
    max: 0.1
"""
N = 60  # completed trials before the agent starts
BEST = 17  # the one with the best value among them


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["journal", "postgresql"])
def sweep(request, tmp_path):
    """(plan, environ) of a random sweep holding N completed trials written as agents write them."""
    name = f"scale-{request.param[:2]}-{tmp_path.name[-12:].replace('_', '-')}"
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.format(name=name))
    url = str(tmp_path / "sweep.journal") if request.param == "journal" else request.getfixturevalue("postgres")
    environ = clean_env(tmp_path, SWEEP_CONFIG=str(config), SWEEP_STORAGE=url, WANDB_MODE="offline")
    p = plan(environ)
    add_trials(open_study(p), range(N))
    return p, environ


def value_of(i: int) -> float:
    return 0.99 if i == BEST else 0.5 + i / 1000


def add_trials(study, numbers, value=value_of) -> None:
    study.add_trials([optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=value(i), params={"learning_rate": 0.01},
        distributions={"learning_rate": FloatDistribution(0.001, 0.1)},
        system_attrs={"sweep_key": f"trial-{i}", "heartbeat": 1.0},
        user_attrs={"run_id": f"run{i:05d}", "values": {"learning_rate": 0.01}}) for i in numbers])


class Reads:
    """What the storages hand out, counted around Optuna's own read calls (the classes', so every storage
    object an agent opens is counted): whole-study reads, and trials read whole."""

    def __init__(self, monkeypatch):
        self.whole_study = 0
        self.trials = 0
        for cls, name in ((optuna.storages.JournalStorage, "get_all_trials"), (optuna.storages.RDBStorage, "_get_trials"),
                          (optuna.storages.JournalStorage, "get_trial"), (optuna.storages.RDBStorage, "get_trial")):
            monkeypatch.setattr(cls, name, self._counting(getattr(cls, name), name))

    def _counting(self, read, name):
        def counted(storage, *args, **kwargs):
            got = read(storage, *args, **kwargs)
            states = kwargs.get("states", args[2] if len(args) > 2 else None)
            if name == "get_all_trials" and states is None:
                self.whole_study += 1
            self.trials += len(got) if isinstance(got, list) else 1
            return got
        return counted


def test_per_trial_the_agent_reads_what_changed_and_the_best_alias_sees_other_agents(sweep, monkeypatch):
    p, environ = sweep
    agent = osa.Agent(p, environ)
    reads = Reads(monkeypatch)
    assert ost._completed(agent) == ("val_accuracy", "maximize", [value_of(BEST)])  # the agent's first look
    if "://" in p.storage_url:  # one query for the finished trials' keys, states and values: none read whole
        assert (reads.whole_study, reads.trials) == (0, 0)
    else:  # the journal's replayed trials, by reference
        assert (reads.whole_study, reads.trials) == (1, N)
    reads.whole_study = 0
    other = open_study(p, open_storage(p.storage_url))  # another agent, finishing trials meanwhile
    for k in range(3):
        before = reads.trials
        ledger = agent.ledger()
        agent.fail_stale(ledger)
        agent.queue_retries(ledger)
        assert not ledger.finished() and ledger.work_available()
        trial = agent.study.ask()
        assert agent._settle(trial, grid=False).verdict(agent.storage.get_trial(trial._trial_id)) is None
        add_trials(other, [N + 10 + k], value=lambda i: 0.995 + k / 1000)  # better than any before
        metric, goal, done = ost._completed(agent)
        # the alias: this trial's value is best only above the other agent's newest result
        assert done == [0.995 + k / 1000]
        assert artifact.beats(0.9955 + k / 1000, goal, done) and not artifact.beats(0.994 + k / 1000, goal, done)
        agent.study.tell(trial, 0.5)
        # per trial: its own trial and the other agent's, a few times each; never the sweep
        assert reads.whole_study == 0 and reads.trials - before <= 12, (k, reads.trials - before)
    agent.say_best()
    assert agent.ledger().best.number == N + 5  # the other agent's last: after the agent's and its own three each


def test_sweep_status_sums_up_a_large_sweep_and_lists_every_trial_on_request(sweep, monkeypatch, capsys):
    p, environ = sweep
    monkeypatch.setattr(oss, "SHOWN", 5)
    monkeypatch.setattr(oss, "SAMPLE", 20)
    study = optuna.load_study(study_name=p.name, storage=open_storage(p.storage_url, write=False))
    text = oss.format_status(study)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[2:7]] == [str(i) for i in range(N - 5, N)]
    assert lines[7] == f"(the last 5 of {N} trials; --all lists every one)"
    assert lines[8] == f"{N} complete"
    assert lines[9].startswith(f"best: trial {BEST} val_accuracy 0.9900")
    every = oss.format_status(study, every=True).splitlines()
    assert [line.split()[0] for line in every[2:2 + N]] == [str(i) for i in range(N)]
    assert every[2 + N] == f"{N} complete"
    found = oss.findings_text(study)
    assert found.splitlines()[-1] == (f"(read from 20 of the {N} completed trials, drawn at random, the best among "
                                      "them; --all reads every one)")
    assert f"best trial {BEST}:" in found
    assert "read from" not in oss.findings_text(study, every=True)


@pytest.mark.slow
def test_the_bench_measures_each_size_and_storage(tmp_path, fashion_dir_1k_test):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sweep_scale.py"), "--sizes", "0,30", "--trials", "2",
                           "--storages", "journal", "--data-dir", str(fashion_dir_1k_test), "--json", str(out)],
                          env=clean_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["storage"], r["trials"]) for r in rows] == [("journal", 0), ("journal", 30)]
    for r in rows:
        assert r["start"] > 0 and r["status_s"] > 0 and r["peak_rss_mb"] > r["sweep_rss_mb"] > 0 and len(r["trial"]) == 1, r
        assert 0 < r["agent"][0] < r["trial"][0], r
    table = proc.stdout.splitlines()
    assert table[0].startswith("| storage | trials |")
    assert [line.split("|")[2].strip() for line in table[2:]] == ["0", "30", "per 1,000"]
