"""What one sweep trial costs, phase by phase, each way a trial runs.

    .venv/bin/python bench/trials.py                         # 4 trials each way, CPU: ~2 min on 2 cores
    .venv/bin/python bench/trials.py --trials 6 --json trials.json
    .venv/bin/python bench/trials.py --ways agent --device cuda

The trial is the smallest whole one: 1 epoch on 120 training images (train_stride 500), val_size 100,
the 10 000 test images, Fashion-MNIST; everything else at the defaults (watch, checkpoint, ONNX export
checked with onnxruntime, model artifact). W&B offline. The ways:
  process   what `wandb agent` starts for every run of a W&B sweep: `python -m app train --key=value`
            in a new process, with the sweep's environment (WANDB_SWEEP_ID, WANDB_RUN_ID,
            WANDB_SWEEP_PARAM_PATH); one process per trial
  agent     the offline agent (`python -m app offline-agent`), one process for all the trials of a
            grid over the seed
  warm      the warm W&B-sweep agent's process (`python -m app.sweep.wandb.warm_agent`, which the container
            entrypoint starts with AGENT_PROCESS=warm after its checks): one process taking the runs of a
            W&B grid sweep over the seed, served by the local stand-in of W&B's API
            (tests/fake_wandb.py) on loopback
  tutorial  the W&B tutorial's code (bench/tutorial.py) as its script runs it: a process per run
Every process is started by this script through its `--child` form, which records train()'s phase marks
(app.phases) and hands them back; the time from starting the process to train() is `start`.

Phases (seconds): start = process start and imports, or in a warm process the agent's work between
trials; checks = settings, folders, data files; wandb_init; data = read, decode, move to the device;
model = model, optimizer, step (+ CUDA graph capture), watch, resume check; training = the epochs
(validation and epoch checkpoints included); evaluation = the test set; export = ONNX export and its
onnxruntime check; artifact = the model artifact and the ONNX file saved to the run; finish =
run.finish and the run folder's links; exit = the last mark to the process's end (a process per
trial; a warm process's one exit is printed apart). compute = training + evaluation; `beyond` = total -
compute.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

CHILD = "--child"

if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == CHILD:
    # the child: nothing imported before the program it runs, so `start` is that program's own start-up
    _out, _kind, *_args = sys.argv[2:]
    sys.path[0] = os.getcwd()  # run from the repository root, as `python -m app` is

    def _dump() -> None:
        from app import phases

        with open(_out, "w") as f:
            json.dump({"marks": phases.take(), "end": time.perf_counter(), "peak_rss_kb": _peak_rss_kb()}, f)

    def _peak_rss_kb() -> int | None:
        """This process's own peak RSS (VmHWM): getrusage's ru_maxrss keeps the parent's peak across fork and exec."""
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            return None

    import atexit

    from app import phases

    phases.record()
    atexit.register(_dump)  # runs after the program's own exit code is decided, before W&B's service ends
    if _kind in ("app", "app.sweep.wandb.warm_agent"):
        import runpy

        sys.argv = [_kind, *_args]
        runpy.run_module(_kind, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from trials_tutorial import run_tutorial_trial

        run_tutorial_trial(*_args)
    sys.exit(0)

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[1:1] = [str(REPO), str(REPO / "bench")]
from bench import SOURCE, BenchError, prepare_data  # noqa: E402  (the benchmarks' one data set-up)
PHASES = ("start", "checks", "wandb_init", "data", "model", "training", "evaluation", "export", "artifact",
          "finish", "exit")
WAYS = ("process", "agent", "warm", "tutorial")
TRIAL = {"DATASET": "fashion_mnist", "EPOCHS": "1", "TRAIN_STRIDE": "500", "VAL_SIZE": "100"}


def trial_phases(marks: list[tuple[str, float]], origin: float) -> list[dict[str, float]]:
    """Split one process's marks into trials (each ends at its `finish`); a phase = its mark - the one before."""
    trials, current, last = [], {}, origin
    for name, t in marks:
        current[name] = current.get(name, 0.0) + (t - last)
        last = t
        if name == "finish":
            trials.append(current)
            current = {}
    return trials


def child(kind: str, args: list[str], environ: dict[str, str], work: Path, log: Path, timeout: float) -> tuple[list[dict], float]:
    """Start one child process; (its trials' phases, the seconds from the last mark to its end)."""
    out = work / f"marks-{time.monotonic_ns()}.json"
    with open(log, "ab") as stream:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHILD, str(out), kind, *args],
                              cwd=REPO, env=environ, stdout=stream, stderr=subprocess.STDOUT, timeout=timeout)
        t_end = time.perf_counter()
    if proc.returncode != 0:
        raise BenchError(f"a {kind} child exited {proc.returncode}; its output is in {log}")
    got = json.loads(out.read_text())
    trials = trial_phases([tuple(m) for m in got["marks"]], t0)
    last = got["marks"][-1][1] if got["marks"] else t0
    return trials, t_end - last


def base_environ(work: Path, data_dir: Path, device: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**keep, **TRIAL, "DATA_DIR": str(data_dir), "OUTPUT_DIR": str(work / "outputs"), "DEVICE": device,
            "WANDB_MODE": "offline", "WANDB_DIR": str(work / "runs"), "WANDB_PROJECT": "trials",
            "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "ALLOW_CPU": "true"}


def run_process(n: int, environ: dict[str, str], work: Path, log: Path) -> list[dict]:
    """Like `wandb agent`: each run a new `python -m app train --key=value` with the sweep's environment."""
    import random

    trials = []
    for i in range(n):
        run_id = "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        params = work / f"params-{run_id}.yaml"
        params.write_text(f"seed:\n  value: {i}\n")
        sweep_env = {**environ, "WANDB_SWEEP_ID": "benchsweep", "WANDB_RUN_ID": run_id,
                     "WANDB_SWEEP_PARAM_PATH": str(params)}
        (got,), exit_s = child("app", ["train", f"--seed={i}"], sweep_env, work, log, timeout=600)
        trials.append({**got, "exit": exit_s})
    return trials


def sweep_yaml(work: Path, n: int) -> Path:
    path = work / "trials-sweep.yaml"
    path.write_text("name: trials\nmethod: grid\nmetric:\n  name: val_accuracy\n  goal: maximize\n"
                    f"parameters:\n  seed:\n    values: [{', '.join(str(i) for i in range(n))}]\n")
    return path


def run_agent(n: int, environ: dict[str, str], work: Path, log: Path) -> tuple[list[dict], float]:
    """The offline agent: one process, n trials back to back; (trials, the process's exit once)."""
    sweep = sweep_yaml(work, n)
    env = {**environ, "SWEEP_STORAGE": str(work / f"agent-{time.monotonic_ns()}.journal")}
    trials, exit_s = child("app", ["offline-agent", "--config", str(sweep), "--count", str(n)], env, work, log, 900)
    if len(trials) != n:
        raise BenchError(f"the offline agent ran {len(trials)} of {n} trials; its output is in {log}")
    return trials, exit_s


def run_warm(n: int, environ: dict[str, str], work: Path, log: Path) -> tuple[list[dict], float]:
    """A warm W&B-sweep agent: runs handed out by the stand-in W&B API, one process for all of them."""
    sys.path.insert(0, str(REPO / "tests"))
    from fake_wandb import FakeWandb

    sweep = {"method": "grid", "metric": {"name": "val_accuracy", "goal": "maximize"},
             "parameters": {"seed": {"values": list(range(n))}},
             "command": ["${env}", "${interpreter}", "-m", "app", "train", "${args}"]}
    with FakeWandb(sweep) as api:
        # the warm process itself, as the entrypoint (AGENT_PROCESS=warm, AGENT_RUN_MODE=offline) starts it
        # after its checks: the runs' WANDB_MODE in its environment, the agent's own calls to the server
        env = {**environ, "WANDB_BASE_URL": api.url, "WANDB_API_KEY": "k" * 40}
        trials, exit_s = child("app.sweep.wandb.warm_agent", ["--sweep", api.sweep_path, "--count", str(n)], env, work, log, 900)
    if len(trials) != n:
        raise BenchError(f"the warm agent ran {len(trials)} of {n} trials; its output is in {log}")
    return trials, exit_s


def run_tutorial(n: int, environ: dict[str, str], work: Path, log: Path, data_dir: Path, device: str) -> list[dict]:
    trials = []
    for i in range(n):
        (got,), exit_s = child("tutorial", [str(data_dir), device, str(i), str(work / "tutorial")], environ, work, log, 600)
        trials.append({**got, "exit": exit_s})
    return trials


def imports_baseline(n: int) -> list[float]:
    """`python -c 'import torch, wandb'`, n times: what any process that trains with W&B pays first."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, wandb"], check=True, cwd=REPO)
        times.append(time.perf_counter() - t0)
    return times


def summarize(trials: list[dict], process_exit: float | None = None) -> dict[str, Any]:
    """`process_exit`: a warm process ends once, after all its trials: said apart, in no trial's total."""
    totals = [sum(t.values()) for t in trials]
    compute = [t.get("training", 0.0) + t.get("evaluation", 0.0) for t in trials]
    return {"trials": trials, "total": totals, "compute": compute,
            "beyond": [a - b for a, b in zip(totals, compute)], "process_exit": process_exit}


GPU_MEMORY = re.compile(r"GPU memory after the run: (\d+) bytes allocated, (\d+) reserved")


def gpu_memory(log_text: str) -> list[dict[str, int]]:
    """What a warm process still held on the GPU after each of its runs, as it logged it (CUDA only)."""
    return [{"allocated": int(a), "reserved": int(r)} for a, r in GPU_MEMORY.findall(log_text)]


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(report: dict) -> str:
    head = ["way", "trial", *PHASES, "total", "compute", "beyond"]
    lines = [" ".join(f"{h:>10}" for h in head)]
    for way, s in report["ways"].items():
        for i, t in enumerate(s["trials"]):
            row = [way, str(i + 1), *(fmt(t.get(p)) for p in PHASES), fmt(s["total"][i]), fmt(s["compute"][i]),
                   fmt(s["beyond"][i])]
            lines.append(" ".join(f"{c:>10}" for c in row))
    imports = statistics.median(report["import_torch_wandb"]) if report["import_torch_wandb"] else None
    lines.append("")
    if imports is not None:
        lines.append(f"python -c 'import torch, wandb': median {imports:.2f} s over {len(report['import_torch_wandb'])}")
    for way, s in report["ways"].items():
        # a warm process: its first trial pays the start-up once; the further trials are the rate
        further = s["beyond"][1:] if way in ("agent", "warm") and len(s["beyond"]) > 1 else s["beyond"]
        beyond = statistics.median(further)
        extra = ""
        if way in ("process", "tutorial") and imports is not None:
            extra = f", beyond imports + compute {beyond - imports:.2f} s"
        which = "further trials" if further is not s["beyond"] else "trials"
        if s["process_exit"] is not None:
            extra += f"; the process's exit after its last trial {s['process_exit']:.2f} s (in no trial)"
        lines.append(f"{way}: median total {statistics.median(s['total']):.2f} s, beyond compute {beyond:.2f} s "
                     f"({which}){extra}")
        if s.get("gpu_memory_after_runs"):
            held = ", ".join(f"{m['allocated'] / 2**20:.0f}/{m['reserved'] / 2**20:.0f}" for m in s["gpu_memory_after_runs"])
            lines.append(f"{way}: GPU memory after each run, MiB allocated/reserved: {held}")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4, help="trials each way (default: 4)")
    ap.add_argument("--ways", default="process,agent,warm,tutorial", help=f"comma-separated, of {', '.join(WAYS)}")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    ap.add_argument("--source", default=SOURCE, help=f"folder with the four Fashion-MNIST .gz files (default: {SOURCE})")
    ap.add_argument("--data-dir", help="a torchvision data root with FashionMNIST/raw, used instead of copying --source")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    ap.add_argument("--work-dir", help="keep runs, outputs and logs here (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or set(ways) - set(WAYS):
        ap.error(f"--ways {args.ways!r}: choose from {', '.join(WAYS)}")
    if args.trials < 1:
        ap.error("--trials must be >= 1")
    with tempfile.TemporaryDirectory(prefix="trials-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        try:
            data_dir = prepare_data(args, work).resolve()
            environ = base_environ(work, data_dir, args.device)
            log = work / "children.log"
            report: dict[str, Any] = {"settings": {"trials": args.trials, "device": args.device, **TRIAL},
                                      "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
                                      "ways": {}}
            report["import_torch_wandb"] = imports_baseline(min(args.trials, 3)) if {"process", "tutorial"} & set(ways) else []
            for way in ways:
                process_exit = None
                logged = log.stat().st_size if log.exists() else 0
                if way == "process":
                    trials = run_process(args.trials, environ, work, log)
                elif way == "agent":
                    trials, process_exit = run_agent(args.trials, environ, work, log)
                elif way == "warm":
                    trials, process_exit = run_warm(args.trials, environ, work, log)
                else:
                    trials = run_tutorial(args.trials, environ, work, log, data_dir, args.device)
                report["ways"][way] = summarize(trials, process_exit)
                with log.open("rb") as f:  # this way's children only
                    f.seek(logged)
                    report["ways"][way]["gpu_memory_after_runs"] = gpu_memory(f.read().decode(errors="replace"))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        import torch
        import wandb

        report["machine"].update(torch=torch.__version__, wandb=wandb.__version__)
        print(table(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
