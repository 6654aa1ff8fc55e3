"""GPU slots: N agents spread over G (fake) GPUs through lock files, a dead agent's slot is taken again,
agents on two hosts sharing one folder never collide, and agents on one GPU get equal memory shares.

The agents are real processes that do what the entrypoint does: claim a slot, then exec into another
program (here `sleep`, standing in for `wandb agent`) that keeps holding it. GPU_HOST_ID names the
"host" each agent believes it runs on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, clean_env

from app import gpu_share, runlog
from app.container import gpu_slots
from app.errors import UserError

# claim a slot, report it as one JSON line, then become a long-lived program like the entrypoint does
AGENT = """
import json, os, sys
from app.container import gpu_slots
env = gpu_slots.assign(os.environ)
keys = ("CUDA_VISIBLE_DEVICES", "GPU_MEMORY_FRACTION", "GPU_SLOT", "GPU_SLOTS_DIR", "AGENT_INDEX")
print(json.dumps({k: env.get(k) for k in keys}), flush=True)
os.execvp("sleep", ["sleep", "300"])
"""


class Agents:
    def __init__(self, tmp: Path, **env: str):
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "GPU_MEMORY_FRACTION",
                                                                         "AGENTS_PER_GPU", "NVIDIA_VISIBLE_DEVICES",
                                                                         "SLURM_JOB_ID")},
                    "GPU_SLOTS_DIR": str(tmp / "slots"), "GPU_HOST_ID": "host-a", "PYTHONPATH": str(REPO), **env}
        self.procs: list[subprocess.Popen] = []

    def start(self, n: int, **env: str) -> list[subprocess.Popen]:
        """Start n agents at once (they race for slots), without waiting for them."""
        new = [subprocess.Popen([sys.executable, "-c", AGENT], env={**self.env, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(n)]
        self.procs += new
        return new

    @staticmethod
    def slot(proc: subprocess.Popen) -> dict:
        line = proc.stdout.readline()
        assert line, f"agent failed: {proc.stderr.read()}"
        return json.loads(line)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
            p.stderr.close()


@pytest.fixture
def agents(tmp_path: Path):
    a = Agents(tmp_path)
    yield a
    a.close()


@pytest.mark.parametrize("n, g, per_gpu", [(1, 1, [1]), (4, 2, [2, 2]), (3, 2, [2, 1]), (5, 2, [3, 2]), (2, 4, [1, 1, 0, 0])])
def test_n_agents_spread_evenly_over_g_gpus(agents: Agents, n: int, g: int, per_gpu: list[int]):
    slots = [agents.slot(p) for p in agents.start(n, GPU_COUNT=str(g))]
    counts = Counter(s["CUDA_VISIBLE_DEVICES"] for s in slots)
    assert [counts.get(str(i), 0) for i in range(g)] == per_gpu
    assert len({s["GPU_SLOT"] for s in slots}) == n  # no two agents in one slot
    assert sorted(int(s["AGENT_INDEX"]) for s in slots) == list(range(n))  # claims were serialised
    for s in slots:
        assert s["GPU_MEMORY_FRACTION"] is None  # no AGENTS_PER_GPU: the share is taken as each run starts
        sharing = counts[s["CUDA_VISIBLE_DEVICES"]]
        # as a run starts now: alone -> no cap; shared -> 1/(agents there), the first agent included
        assert gpu_share.run_share(s) == (None if sharing == 1 else pytest.approx(1 / sharing))


def test_agents_per_gpu_gives_every_agent_its_share_and_caps_the_slots(agents: Agents):
    slots = [agents.slot(p) for p in agents.start(4, GPU_COUNT="2", AGENTS_PER_GPU="2")]
    assert Counter(s["CUDA_VISIBLE_DEVICES"] for s in slots) == {"0": 2, "1": 2}
    assert {s["GPU_MEMORY_FRACTION"] for s in slots} == {"0.5000"}  # the first agents too, not just the late ones
    (extra,) = agents.start(1, GPU_COUNT="2", AGENTS_PER_GPU="2")
    assert extra.wait(timeout=60) == 1
    assert "all 4 GPU slots are taken (2 GPU(s) x AGENTS_PER_GPU=2)" in extra.stderr.read()


def test_a_killed_agent_frees_its_slot_for_the_next(agents: Agents):
    first = agents.start(4, GPU_COUNT="2")
    slots = [agents.slot(p) for p in first]
    victim = next(i for i, s in enumerate(slots) if s["CUDA_VISIBLE_DEVICES"] == "1")
    # the slot is held by the exec'ed program (the lock fd survived exec), until the kernel drops it;
    # the agent prints its slot just before exec, so give the exec a moment to happen
    cmdline = Path(f"/proc/{first[victim].pid}/cmdline")
    deadline = time.monotonic() + 10
    while not cmdline.read_bytes().startswith(b"sleep") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cmdline.read_bytes().startswith(b"sleep")
    os.kill(first[victim].pid, signal.SIGKILL)  # a crash: no cleanup code runs
    first[victim].wait(timeout=10)
    (replacement,) = agents.start(1, GPU_COUNT="2")
    taken = agents.slot(replacement)
    assert taken["CUDA_VISIBLE_DEVICES"] == "1" and taken["GPU_SLOT"] == slots[victim]["GPU_SLOT"]
    assert gpu_share.run_share(taken) == 0.5  # it shares GPU 1 with the survivor there
    # with everyone alive again the next agent goes to the least-loaded GPU: they tie, so GPU 0
    (fifth,) = agents.start(1, GPU_COUNT="2")
    assert agents.slot(fifth)["CUDA_VISIBLE_DEVICES"] == "0"


def test_agents_pinned_to_different_gpus_never_share_a_slot(agents: Agents):
    # `python -m app launch` exposes one GPU per container (CUDA index 0 in each) and names it in
    # NVIDIA_VISIBLE_DEVICES: the host id keys the slot, so GPUs 0 and 1 are not counted as one
    a = agents.slot(agents.start(1, GPU_COUNT="1", NVIDIA_VISIBLE_DEVICES="0")[0])
    b = agents.slot(agents.start(1, GPU_COUNT="1", NVIDIA_VISIBLE_DEVICES="1")[0])
    c = agents.slot(agents.start(1, GPU_COUNT="1", NVIDIA_VISIBLE_DEVICES="1")[0])
    assert (a["CUDA_VISIBLE_DEVICES"], b["CUDA_VISIBLE_DEVICES"], c["CUDA_VISIBLE_DEVICES"]) == ("0", "0", "0")
    assert (a["GPU_SLOT"], b["GPU_SLOT"], c["GPU_SLOT"]) == (
        "gpu-host-a-0.slot-0", "gpu-host-a-1.slot-0", "gpu-host-a-1.slot-1")
    assert gpu_share.run_share(a) is None and gpu_share.run_share(c) == 0.5


def test_two_hosts_sharing_one_runs_folder_never_collide(agents: Agents):
    # two hosts each with GPUs 0 and 1, one runs folder (NFS, a ReadWriteMany volume) for all four agents:
    # every agent is alone on its GPU, though each host's GPUs are called 0 and 1 there
    on_a = [agents.slot(p) for p in agents.start(2, GPU_COUNT="2", GPU_HOST_ID="host-a")]
    on_b = [agents.slot(p) for p in agents.start(2, GPU_COUNT="2", GPU_HOST_ID="host-b")]
    assert sorted(s["CUDA_VISIBLE_DEVICES"] for s in on_a) == sorted(s["CUDA_VISIBLE_DEVICES"] for s in on_b) == ["0", "1"]
    assert len({s["GPU_SLOT"] for s in on_a + on_b}) == 4
    assert all(s["GPU_SLOT"].endswith(".slot-0") and gpu_share.run_share(s) is None for s in on_a + on_b)
    # a third agent on host b shares one of b's GPUs, not one of a's
    third = agents.slot(agents.start(1, GPU_COUNT="2", GPU_HOST_ID="host-b")[0])
    assert third["GPU_SLOT"].startswith("gpu-host-b-") and third["GPU_SLOT"].endswith(".slot-1")
    assert gpu_share.run_share(third) == 0.5
    assert [gpu_share.run_share(s) for s in on_a] == [None, None]
    # GPUs known by UUID (nvidia-smi, the k8s device plugin) are keyed by it on any host
    uuid = "GPU-2f5a8f1e-0000-1111-2222-333344445555"
    x = agents.slot(agents.start(1, GPU_COUNT="1", NVIDIA_VISIBLE_DEVICES=uuid, GPU_HOST_ID="host-a")[0])
    y = agents.slot(agents.start(1, GPU_COUNT="1", NVIDIA_VISIBLE_DEVICES=uuid, GPU_HOST_ID="host-b")[0])
    assert (x["GPU_SLOT"], y["GPU_SLOT"]) == (f"gpu-{uuid}.slot-0", f"gpu-{uuid}.slot-1")


def test_three_agents_on_one_gpu_get_equal_shares_without_agents_per_gpu(agents: Agents):
    first = agents.slot(agents.start(1, GPU_COUNT="1")[0])
    assert gpu_share.run_share(first) is None  # alone so far: a run starting now takes what it needs
    later = [agents.slot(p) for p in agents.start(2, GPU_COUNT="1")]
    # the first agent's next run counts the agents that joined since: all three get a third
    assert [gpu_share.run_share(s) for s in (first, *later)] == [pytest.approx(1 / 3)] * 3
    assert {s["GPU_SLOTS_DIR"] for s in (first, *later)} == {str(agents.env["GPU_SLOTS_DIR"])}


def test_gpu_ids_from_device_nodes_smi_and_settings(tmp_path: Path):
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    nodes = str(dev / "nvidia[0-9]*")
    host = {"GPU_HOST_ID": "h1"}
    no_smi = list  # nvidia-smi lists nothing
    assert gpu_slots.gpu_ids(host, dev_glob=nodes, smi=no_smi) == ["h1-0", "h1-1", "h1-2"]
    assert gpu_slots.gpu_ids({**host, "NVIDIA_VISIBLE_DEVICES": "all"}, dev_glob=nodes, smi=no_smi) == ["h1-0", "h1-1", "h1-2"]
    assert gpu_slots.gpu_ids({**host, "NVIDIA_VISIBLE_DEVICES": "1,3,5"}, dev_glob=nodes, smi=no_smi) == ["h1-1", "h1-3", "h1-5"]
    uuid = "GPU-2f5a8f1e-0000-1111-2222-333344445555"
    assert gpu_slots.gpu_ids({**host, "NVIDIA_VISIBLE_DEVICES": uuid, "GPU_COUNT": "1"}, dev_glob=nodes) == [uuid]
    uuids = ["GPU-aaaa-0001", "GPU-aaaa-0002", "GPU-aaaa-0003"]
    assert gpu_slots.gpu_ids(host, dev_glob=nodes, smi=lambda: uuids) == uuids  # the driver's UUIDs win
    empty = str(tmp_path / "none" / "nvidia[0-9]*")
    assert gpu_slots.gpu_ids(host, dev_glob=empty, smi=lambda: ["", ""]) == ["h1-0", "h1-1"]  # nvidia-smi -L as fallback
    assert gpu_slots.gpu_ids(host, dev_glob=empty, smi=no_smi) == []
    assert gpu_slots.gpu_ids({"GPU_COUNT": "0"}, dev_glob=nodes) == []
    # the host id: GPU_HOST_ID, else the machine id, else (outside a container) the hostname
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    assert gpu_slots.host_id({}, machine_id) == "3d1219c7c4c5"
    assert gpu_slots.host_id({"GPU_HOST_ID": "node07"}, machine_id) == "node07"
    assert gpu_slots.gpu_ids({"GPU_COUNT": "1"}, machine_id=machine_id) == ["3d1219c7c4c5-0"]
    with pytest.raises(UserError, match="GPU_COUNT='two' must be a whole number"):
        gpu_slots.gpu_ids({"GPU_COUNT": "two"})


def test_no_gpu_or_a_hand_set_pin_leaves_the_environment_alone(tmp_path: Path, capsys):
    base = {"GPU_SLOTS_DIR": str(tmp_path / "slots")}
    assert gpu_slots.assign(base, gpus=[]) == base
    pinned = {**base, "CUDA_VISIBLE_DEVICES": "1"}
    assert gpu_slots.assign(pinned, gpus=["0", "1"]) == pinned
    # Slurm's GRES chose the GPU: used as given
    by_slurm = {**pinned, "SLURM_JOB_ID": "17"}
    assert gpu_slots.assign(by_slurm, gpus=["0", "1"]) == by_slurm
    assert "CUDA_VISIBLE_DEVICES=1 was set by Slurm" in capsys.readouterr().err
    assert not (tmp_path / "slots").exists()


def test_memory_share_respects_a_chosen_fraction_and_replaces_zero(tmp_path: Path):
    try:
        base = {"GPU_SLOTS_DIR": str(tmp_path / "slots"), "GPU_MEMORY_FRACTION": "0"}  # .env.example's value
        gpu_slots.assign(base, gpus=["0"])
        second = gpu_slots.assign(base, gpus=["0"])
        assert second["GPU_MEMORY_FRACTION"] == "0" and gpu_share.run_share(second) == 0.5  # 0: chosen by the run
        chosen = gpu_slots.assign({**base, "GPU_MEMORY_FRACTION": "0.2"}, gpus=["0"])
        assert chosen["GPU_MEMORY_FRACTION"] == "0.2" and chosen["GPU_SLOT"] == "gpu-0.slot-2"
    finally:
        gpu_slots.release_all()
    # released: the same slots are free again
    assert gpu_slots.assign({"GPU_SLOTS_DIR": str(tmp_path / "slots")}, gpus=["0"])["GPU_SLOT"] == "gpu-0.slot-0"
    gpu_slots.release_all()


def test_bad_settings_are_one_line(tmp_path: Path):
    with pytest.raises(UserError, match="AGENTS_PER_GPU='0' must be a positive integer"):
        gpu_slots.assign({"GPU_SLOTS_DIR": str(tmp_path), "AGENTS_PER_GPU": "0"}, gpus=["0"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"GPU_SLOTS_DIR='.*file/slots' is not usable for GPU slot locks"):
        gpu_slots.assign({"GPU_SLOTS_DIR": str(blocker / "slots")}, gpus=["0"])
    # WANDB_DIR (the shared runs volume) is the default home of the slot locks
    assert gpu_share.slots_dir({"WANDB_DIR": "/runs"}) == Path("/runs/.gpu-slots")


@pytest.mark.slow
def test_an_in_process_agent_trains_on_the_gpu_of_its_slot(agents: Agents, tmp_path: Path, small_data: Path):
    """The offline-sweep agent trains in the entrypoint's own process: CUDA reads CUDA_VISIBLE_DEVICES
    from that process's environment, so the slot it claimed must be there, not only in a copy."""
    held = agents.slot(agents.start(1, GPU_COUNT="2")[0])  # another agent holds GPU 0
    assert held["CUDA_VISIBLE_DEVICES"] == "0"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: slot\nmethod: grid\nmetric: {name: val_loss, goal: minimize}\n"
                     "parameters:\n  learning_rate: {values: [0.01]}\n")
    env = clean_env(tmp_path, APP_MODE="offline-sweep", SWEEP_CONFIG=str(sweep), GPU_COUNT="2", DEVICE="cpu",
                    GPU_SLOTS_DIR=str(tmp_path / "slots"), GPU_HOST_ID="host-a", DATA_DIR=str(small_data),
                    EPOCHS="1", VAL_SIZE="100", WATCH_LOG="none", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "runs"),
                    OUTPUT_DIR=str(tmp_path / "outputs"))
    proc = subprocess.run([sys.executable, "-m", "app.container.entrypoint"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "CUDA_VISIBLE_DEVICES=1" in proc.stderr  # the free GPU's slot
    [run] = [runlog.read(f) for f in runlog.find(tmp_path / "runs")]
    assert run.exit_code == 0 and run.summary["cuda_visible_devices"] == "1"
