"""Where W&B's cost in a training run comes from, part by part, measured in one process.

    .venv/bin/python bench/wandb_parts.py                      # ~2 min on 2 CPU cores
    .venv/bin/python bench/wandb_parts.py --windows 24 --json parts.json
    python3 bench/wandb_parts.py --device cuda --data-dir data

bench/bench.py measures W&B's overhead end to end (a whole run offline vs one with W&B disabled). On a
machine whose speed drifts between runs minutes apart, that cannot separate a few per cent from drift.
Here short windows of the same training loop (train()'s own step, batches, model and optimizer, so a CUDA
device replays the CUDA graph as train() does) alternate with and without one part of W&B, many times,
and each part's cost is the median of the paired ratios:
  run     an offline run is open (wandb-core running, console captured) vs no run at all
  watch   run.watch(model, log="gradients", log_freq=1000) hooks on vs off, the run open
  log     one run.log({"epoch", "loss"}, step=...) call, in microseconds; its share of training time at
          log_interval batches per call = that / (log_interval x the step time measured here)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[1:1] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from app import data  # noqa: E402
from app.config import Config  # noqa: E402
from app.errors import UserError  # noqa: E402
from bench import SOURCE, bare_loop, machine, prepare_data, resolve_device, spread  # noqa: E402


def paired(on: list[float], off: list[float]) -> dict:
    return spread([a / b - 1 for a, b in zip(on, off)])


def measure(args, data_dir: Path, work: Path) -> dict:
    import wandb

    device = resolve_device(args.device)
    cfg = Config(dataset="fashion_mnist", data_dir=str(data_dir), device=str(device))
    loop = bare_loop(cfg)
    model, step = loop.model, loop.step
    batches = list(data.Batches(loop.setup.ds.train, cfg.batch_size, shuffle=False, **loop.setup.fmt))[:args.steps]

    def window() -> float:
        """Seconds per step over one pass of the batches."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for x, y in batches:
            loss_sum += step(x, y)
        loss_sum.item()  # one sync per window, as train() has one per log point
        return (time.perf_counter() - t0) / len(batches)

    settings = wandb.Settings(silent=True)
    for _ in range(3):  # warm-up: allocator, cuDNN, the graph
        window()
    off, on = [], []
    for i in range(args.windows):
        order = (False, True) if i % 2 == 0 else (True, False)  # neither side always goes first
        for with_run in order:
            if with_run:
                run = wandb.init(mode="offline", dir=str(work), settings=settings)
                window()  # the run's own start-up is not steady state
                on.append(window())
                run.finish()
            else:
                off.append(window())

    run = wandb.init(mode="offline", dir=str(work), settings=settings)
    hooks_on, hooks_off = [], []
    for i in range(args.windows):
        for watched in ((False, True) if i % 2 == 0 else (True, False)):
            if watched:
                run.watch(model, log="gradients", log_freq=1000)
                hooks_on.append(window())
                run.unwatch(model)
            else:
                hooks_off.append(window())
    calls = 200
    t0 = time.perf_counter()
    for i in range(calls):
        run.log({"epoch": 0, "loss": 0.5}, step=1000 + i)
    log_s = (time.perf_counter() - t0) / calls
    run.finish()

    step_s = statistics.median(off)
    return {
        "machine": machine(device),
        "settings": {"device": str(device), "windows": args.windows, "steps_per_window": len(batches),
                     "batch_size": cfg.batch_size, "log_interval": cfg.log_interval},
        "step_ms": spread([s * 1e3 for s in off]),
        "run_open": paired(on, off),
        "watch_hooks": paired(hooks_on, hooks_off),
        "run_log_us": log_s * 1e6,
        "run_log_share": log_s / (cfg.log_interval * step_s),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if visible) | cpu | cuda | cuda:N (default: auto)")
    ap.add_argument("--windows", type=int, default=12, help="paired windows per part (default: 12)")
    ap.add_argument("--steps", type=int, default=25, help="training steps per window (default: 25, log_interval)")
    ap.add_argument("--source", default=SOURCE, help=f"folder with the four Fashion-MNIST .gz files (default: {SOURCE})")
    ap.add_argument("--data-dir", help="use this torchvision data root (with FashionMNIST/raw) instead of copying --source")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args(argv)
    if args.windows < 1 or args.steps < 1:
        ap.error("--windows and --steps must be >= 1")
    try:
        with tempfile.TemporaryDirectory(prefix="wandb-parts-") as tmp:
            report = measure(args, prepare_data(args, Path(tmp)), Path(tmp))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pct = lambda s: f"{s['median']:+.1%} [{s['min']:+.1%}, {s['max']:+.1%}]"  # noqa: E731
    st = report["settings"]
    print(f"device {st['device']}, {st['windows']} paired windows of {st['steps_per_window']} steps, "
          f"step {report['step_ms']['median']:.2f} ms median")
    print(f"offline run open vs none:      {pct(report['run_open'])}")
    print(f"run.watch gradient hooks:      {pct(report['watch_hooks'])}")
    print(f"one run.log call:              {report['run_log_us']:.0f} us = {report['run_log_share']:.2%} of "
          f"training time at log_interval {st['log_interval']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
