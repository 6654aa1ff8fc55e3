"""An offline sweep on the host, laid out as in the image: with no WANDB_DIR, runs and the journal go to
./runs (compose mounts the same folder at /runs), never into the source tree's sweeps/ folder; the agent
ends with the best trial so far; `sweep-status` and `report` find the sweep with no arguments, and
sweep-status prints the command that trains the best trial again."""

from __future__ import annotations

import re
import shlex
import shutil

from conftest import REPO, clean_env, run_app

from app import runlog

SWEEP = """name: host-grid
method: grid
metric: {name: val_accuracy, goal: maximize}
parameters:
  learning_rate: {values: [0.0003, 0.01]}
"""


def test_an_offline_sweep_on_the_host_uses_the_runs_folder_and_is_found_without_arguments(tmp_path, fashion_dir_1k_test):
    project = tmp_path / "project"
    (project / "sweeps").mkdir(parents=True)
    (project / "sweeps" / "host.yaml").write_text(SWEEP)
    data = project / "data"
    shutil.copytree(fashion_dir_1k_test / "FashionMNIST", data / "FashionMNIST")
    env = clean_env(tmp_path, DATASET="fashion_mnist", EPOCHS="1", TRAIN_STRIDE="50", VAL_SIZE="500",
                    LOG_INTERVAL="5", WATCH_LOG="none", DEVICE="cpu", OMP_NUM_THREADS="1")
    agent = run_app(["offline-agent", "--config", "sweeps/host.yaml"], env, project, timeout=600)
    assert agent.returncode == 0, agent.stdout[-3000:] + agent.stderr[-3000:]
    assert (project / "runs" / "sweeps" / "host-grid.journal").is_file()
    assert not (project / "sweeps" / "host-grid.journal").exists()  # not beside the YAML in the source tree
    assert len(runlog.find(project / "runs")) == 2
    # the agent's last word: the best trial so far, in one line
    last = agent.stdout.strip().splitlines()[-1]
    assert re.match(r"\[offline-sweep\] best so far: trial \d, val_accuracy 0\.\d{4} \(learning_rate=", last), last

    status = run_app(["sweep-status"], env, project)
    assert status.returncode == 0, status.stderr
    assert "sweep host-grid: grid, maximize val_accuracy" in status.stdout
    best = re.search(r"^best: trial (\d) val_accuracy ([\d.]+) +learning_rate=([\d.e-]+)", status.stdout, re.M)
    assert best, status.stdout
    # above its command, the device the best trial trained on (the command leaves the device to this host)
    lines = status.stdout.splitlines()
    ran_on = lines[lines.index("train it again with:") - 1]
    assert ran_on.startswith("It trained on cpu with --cuda_graph=") and "add --device=cpu --cuda_graph=" in ran_on, ran_on
    # the command that trains the best trial again: its swept value first, then every setting its run recorded
    command = status.stdout.split("train it again with:\n", 1)[1].split("\n\n")[0].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[:5] == ["python", "-m", "app", "train", f"--learning_rate={float(best[3])!r}"], words
    assert {"--dataset=fashion_mnist", "--epochs=1", "--train_stride=50", "--val_size=500"} <= set(words)
    assert not any(w.startswith(("--data_dir", "--output_dir")) for w in words)  # this host's own places
    assert not any(w.startswith(("--device", "--cuda_graph", "--compile")) for w in words)  # nor its device

    report = run_app(["report"], env, project, timeout=300)
    assert report.returncode == 0, report.stderr
    assert (project / "report" / "index.html").is_file() and "host-grid" in (project / "report" / "index.html").read_text()
    assert (REPO / ".gitignore").read_text().count("/report/") == 1  # what report writes stays out of git
