"""1 vs N sweep agents sharing one GPU: trials per hour and peak GPU memory per agent.

    .venv/bin/python bench/agents_gpu.py                          # 1 and 4 agents, 2 trials each, on cuda
    .venv/bin/python bench/agents_gpu.py --agents 1 2 4 --trials 3 --json agents.json
    .venv/bin/python bench/agents_gpu.py --device cpu --agents 1 2 --trials 1 --train-stride 50   # smoke test

An "agent" here is what one `wandb agent` container does on its GPU slot: trials back to back, each a
`python -m app train` process (offline W&B run, the full config of a sweep trial), with the memory share
the GPU slot gives an agent that shares its GPU (GPU_MEMORY_FRACTION=1/N). N agents start together on the
one device; the trials differ only in seed. Reported per N:
  trials/hour    all trials / wall time of the whole batch (what a sweep's throughput is)
  trial_s        median seconds per trial (process start, W&B, data to the device, train, test, export)
  peak_mib       per agent, the most GPU memory nvidia-smi showed for its training process (CUDA context
                 included), sampled every 0.5 s
Data: the real Fashion-MNIST copied from --source (Debian's dataset-fashion-mnist) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB of GPU memory per process, as nvidia-smi reports it ({} without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            usage[int(pid)] = int(mib)
    return usage


class Agent(threading.Thread):
    def __init__(self, index: int, n: int, args: argparse.Namespace, data_dir: Path, work: Path):
        super().__init__(daemon=True)
        self.index, self.args, self.work = index, args, work / f"agent-{index}"
        self.env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(self.work / "runs"),
                    "OUTPUT_DIR": str(self.work / "outputs"), "DATA_DIR": str(data_dir), "DATASET": "fashion_mnist",
                    "EPOCHS": str(args.epochs), "TRAIN_STRIDE": str(args.train_stride), "DEVICE": args.device,
                    "GPU_MEMORY_FRACTION": f"{1 / n:.4f}" if n > 1 else "0"}
        self.pids: list[int] = []
        self.trial_s: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        (self.work / "runs").mkdir(parents=True, exist_ok=True)
        for trial in range(self.args.trials):
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "app", "train", f"--seed={100 * self.index + trial}"],
                                    env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.pids.append(proc.pid)
            out, _ = proc.communicate()
            if proc.returncode != 0:
                self.failures.append(out[-2000:])
            else:
                self.trial_s.append(time.perf_counter() - t0)


def measure(n: int, args: argparse.Namespace, data_dir: Path, work: Path) -> dict:
    agents = [Agent(i, n, args, data_dir, work / f"n{n}") for i in range(n)]
    peak = {i: 0 for i in range(n)}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            usage = gpu_memory_by_pid()
            for a in agents:
                for pid in a.pids:
                    peak[a.index] = max(peak[a.index], usage.get(pid, 0))
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    for a in agents:
        a.start()
    for a in agents:
        a.join()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    failures = [f for a in agents for f in a.failures]
    if failures:
        raise SystemExit(f"{len(failures)} trial(s) failed with {n} agents; the last said:\n{failures[-1]}")
    trials = sum(len(a.trial_s) for a in agents)
    return {"agents": n, "trials": trials, "wall_s": round(wall, 1), "trials_per_hour": round(trials * 3600 / wall, 1),
            "trial_s_median": round(statistics.median(t for a in agents for t in a.trial_s), 1),
            "peak_mib_per_agent": [peak[i] for i in range(n)] if any(peak.values()) else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, nargs="+", default=[1, 4], help="agent counts to compare (default 1 4)")
    p.add_argument("--trials", type=int, default=2, help="trials per agent (default 2)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    p.add_argument("--train-stride", type=int, default=1, help="every Nth training image (default 1: all 60 000)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    p.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="folder with the four *-ubyte.gz")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="agents-gpu-") as tmp:
        work = Path(tmp)
        raw = work / "data" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in Path(args.source).glob("*-ubyte.gz"):
            shutil.copyfile(f, raw / f.name)
        # unpacked once here, so the agents' first trials don't all unpack it at the same moment
        subprocess.run([sys.executable, "-c", f"from app import data; data.ensure('fashion_mnist', {str(work / 'data')!r})"],
                       cwd=REPO, check=True)
        results = [measure(n, args, work / "data", work) for n in args.agents]
    print(f"{'agents':>6} {'trials':>6} {'wall_s':>7} {'trials/h':>9} {'trial_s':>8}  peak MiB per agent")
    for r in results:
        peaks = " ".join(map(str, r["peak_mib_per_agent"])) if r["peak_mib_per_agent"] else "n/a (no nvidia-smi)"
        print(f"{r['agents']:>6} {r['trials']:>6} {r['wall_s']:>7} {r['trials_per_hour']:>9} {r['trial_s_median']:>8}  {peaks}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
