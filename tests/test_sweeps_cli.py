"""`python -m app sweep validate|create`: local validation, then the real `wandb.sweep` against the stand-in API."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, clean_env, error_lines, run_app
from fake_wandb import FakeWandb

KEY = "k" * 40  # the stand-in accepts any key; wandb only checks its length


@pytest.fixture
def api():
    with FakeWandb() as fake:
        yield fake


def online_env(tmp: Path, api: FakeWandb, **extra: str) -> dict[str, str]:
    return clean_env(tmp, WANDB_BASE_URL=api.url, WANDB_API_KEY=KEY, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", **extra)


@pytest.mark.parametrize("name, summary", [
    ("grid.yaml", "grid sweep over learning_rate, batch_size; maximize val_accuracy; 6 grid points"),
    ("random.yaml", "random sweep over learning_rate, batch_size, kernels; maximize val_accuracy; run_cap 20"),
    ("bayes-hyperband.yaml", "bayes sweep over epochs, learning_rate, batch_size, kernels; minimize val_loss; run_cap 30"),
])
def test_validate_shipped_sweeps(tmp_path: Path, env, name: str, summary: str):
    r = run_app(["sweep", "validate", str(REPO / "sweeps" / name)], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok: {REPO / 'sweeps' / name}: {summary}"


def test_user_mistakes_are_one_line_and_exit_2(tmp_path: Path, env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters:\n  lr: {values: [0.1]}\n")
    cases = {
        ("sweep", "validate", str(bad)): "parameters.lr is not a training setting",
        ("sweep", "validate", str(tmp_path / "absent.yaml")): "does not exist",
        ("sweep", "validate"): "the following arguments are required: file",
        ("sweep", "delete", str(bad)): "invalid choice: 'delete'",
        ("sweep", "create", str(REPO / "sweeps/grid.yaml"), "--projekt", "p"): "unrecognized arguments: --projekt",
    }
    for args, message in cases.items():
        r = run_app(list(args), env, tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        (line,) = error_lines(r.stderr)
        assert message in line, (args, line)
        assert "Traceback" not in r.stderr
    r = run_app(["sweep"], env, tmp_path)
    assert r.returncode == 2 and "validate" in r.stdout


def test_create_prints_the_full_sweep_id_for_env(tmp_path: Path, api: FakeWandb):
    r = run_app(["sweep", "create", str(REPO / "sweeps/grid.yaml"), "--project", "mnist-test", "--entity", "team-x"],
                online_env(tmp_path, api), tmp_path)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("SWEEP_ID=")]
    entity, project, sweep_id = line.removeprefix("SWEEP_ID=").split("/")
    assert (entity, project) == ("team-x", "mnist-test")
    assert f"created: team-x/mnist-test/{sweep_id}" in r.stdout
    # the server received the YAML as written: the sweep's search space and the command the agents run
    sent = api.sweeps[sweep_id]
    shipped = yaml.safe_load((REPO / "sweeps/grid.yaml").read_text())
    assert sent["parameters"] == shipped["parameters"] and sent["command"] == shipped["command"]
    assert sent["method"] == "grid" and sent["metric"] == {"name": "val_accuracy", "goal": "maximize"}
    assert "UpsertSweep" in api.operations


def test_create_reads_env_and_takes_the_entity_the_server_names(tmp_path: Path, api: FakeWandb):
    # a user's .env holds the key and the server address; no --entity: the server's answer names it
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={KEY}\nWANDB_BASE_URL={api.url}\nWANDB_PROJECT=from-dotenv\n")
    env = clean_env(tmp_path, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    r = run_app(["sweep", "create", str(REPO / "sweeps/random.yaml")], env, tmp_path)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("SWEEP_ID=")]
    assert line.startswith(f"SWEEP_ID={api.entity}/from-dotenv/")
    assert KEY not in r.stdout + r.stderr  # the key is never echoed


def test_create_validates_before_contacting_wandb(tmp_path: Path, api: FakeWandb):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nmetric: {name: accuracy}\nparameters: {seed: {values: [1, 2]}}\n")
    r = run_app(["sweep", "create", str(bad)], online_env(tmp_path, api), tmp_path)
    assert r.returncode == 2
    (line,) = error_lines(r.stderr)
    assert "metric.name='accuracy' is never logged by training" in line
    assert api.operations == []  # nothing reached the server


def test_create_needs_a_key_and_the_server(tmp_path: Path, api: FakeWandb, env):
    r = run_app(["sweep", "create", str(REPO / "sweeps/grid.yaml")], env, tmp_path)
    assert r.returncode == 2
    assert error_lines(r.stderr) == ["error: sweep create needs a W&B API key: set WANDB_API_KEY (in .env or the environment) or run `wandb login`"]
    r = run_app(["sweep", "create", str(REPO / "sweeps/grid.yaml")], online_env(tmp_path, api, WANDB_MODE="offline"), tmp_path)
    assert r.returncode == 2
    (line,) = error_lines(r.stderr)
    assert "WANDB_MODE=offline: a W&B sweep lives on the W&B server" in line and "offline-agent" in line
    assert api.operations == []
