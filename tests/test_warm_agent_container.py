"""AGENT_PROCESS=warm in the image: the compose `agent` service serves a W&B sweep (the stand-in API) with
every run in the entrypoint's own process; `docker compose stop` mid-run checkpoints the run, marks it
preempting and the container exits 143; the run handed out again resumes from its checkpoint."""

from __future__ import annotations

import pytest
from conftest import saved_checkpoint, wait_for
from containers import app_image, compose  # noqa: F401  (app_image: the session fixture)
from fake_wandb import FakeWandb
from sweep_project import agent_logs, compose_files, fashion_project, joined, write_env

from app import runlog

pytestmark = [pytest.mark.container, pytest.mark.slow]

TWO_POINTS = {
    "method": "grid",
    "parameters": {"learning_rate": {"values": [0.003, 0.01]}},
    "command": ["${env}", "${interpreter}", "-m", "app", "train", "${args}"],
}
GRACE_S = 60  # docker-compose.yml's stop_grace_period
# the stop comes in epoch 2 (after epoch 1's checkpoint), so 2 epochs are enough to stop a run mid-way
# and to see the resumed one train to the end
EPOCHS = 2




def test_warm_agent_in_the_image_stops_with_143_and_its_run_resumes(app_image: str, tmp_path):
    project = fashion_project(tmp_path / "project")
    with FakeWandb(TWO_POINTS) as api:
        api.hold_open = True  # after the stop, the requeued run is what the next agent gets
        write_env(project, api, AGENT_PROCESS="warm", EPOCHS=str(EPOCHS), TRAIN_STRIDE="5")
        try:
            up = compose("up", "--detach", "agent", project=project, files=compose_files, timeout=300)
            assert up.returncode == 0, up.stderr[-3000:]
            (first,) = wait_for(lambda: api.assignments, 300, "the agent to get its first run")
            ckpt = project / "outputs" / first.run_id / "checkpoint.pt"
            wait_for(lambda: (saved_checkpoint(ckpt) or {}).get("epoch") == 1, 600, "the first epoch's checkpoint")
            stop = compose("stop", "agent", project=project, files=compose_files, timeout=GRACE_S + 60)
            assert stop.returncode == 0, stop.stderr[-3000:]
            stopped_logs = joined(agent_logs(project))
            ps = compose("ps", "--all", "--format", "{{.ExitCode}}", "agent", project=project, files=compose_files)
            assert ps.stdout.split() == ["143"], (ps.stdout, stopped_logs[-4000:])
            assert "every run in this process" in stopped_logs and "starting: " not in stopped_logs  # no `wandb agent`
            (folder,) = runlog.find(project / "runs")
            stopped = runlog.read(folder)
            assert stopped.run_id == first.run_id and stopped.preempting and stopped.exit_code == 143, stopped_logs[-4000:]
            assert saved_checkpoint(ckpt)["epoch"] == 1

            api.requeue(first.run_id)
            api.hold_open = False
            again = compose("up", "agent", project=project, files=compose_files, timeout=900)
            logs = joined(agent_logs(project))
        finally:
            compose("down", "--remove-orphans", project=project, files=compose_files, timeout=120)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert [a.command for a in api.assignments] == ["run", "resume", "run"]
    assert f"resuming run {first.run_id} from /outputs/{first.run_id}/checkpoint.pt: 1 epoch(s) done" in logs
    finals = {r.run_id: r for r in (runlog.read(f) for f in runlog.find(project / "runs") if f != folder)}
    assert sorted(finals) == sorted({a.run_id for a in api.assignments})
    assert all(r.exit_code == 0 and not r.preempting and 0.5 < r.summary["test_accuracy"] <= 1.0 for r in finals.values())
    assert saved_checkpoint(ckpt)["epoch"] == EPOCHS
