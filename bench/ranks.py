"""What a trial on N ranks (GPUS_PER_TRIAL=N, app.ranks) gives against one rank: training throughput
and scaling efficiency, with train() as users run it (W&B disabled), the same config for every N.

    python bench/ranks.py --device cuda --ranks 1,2,4 --json ranks.json   # on a host with 4 GPUs
    python bench/ranks.py --device cpu --ranks 1,2                          # gloo ranks on the CPU

The first epoch of each N is a warm-up (the ranks start, cuDNN picks its kernels) and is not counted;
examples/s is the median of the later epochs' own loop time (train()'s on_epoch figures). Scaling
efficiency = (examples/s with N) / (N x examples/s with 1). An N larger than the visible GPUs is skipped
with a line. On the CPU the ranks share its cores: the figure is what the ranks cost, not a target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(n: int, args, work: Path) -> dict:
    from app.config import Config
    from app.train import train

    config = Config().replace(device=args.device, epochs=args.epochs, batch_size=args.batch_size,
                              train_stride=args.train_stride, val_size=args.val_size, dataset=args.dataset, data_dir=str(args.data_dir),
                              output_dir=str(work / f"outputs-{n}"), watch_log="none", log_interval=1000)
    epochs: list[tuple[float, int]] = []

    def on_epoch(epoch: int, metrics: dict) -> bool:
        epochs.append((metrics["epoch_seconds"], int(metrics["examples"])))
        return False

    environ = {**os.environ, "GPUS_PER_TRIAL": str(n), "WANDB_MODE": "disabled", "WANDB_DIR": str(work / "runs"),
               "WANDB_SILENT": "true"}
    result = train(config, environ, on_epoch=on_epoch)
    timed = epochs[1:] or epochs  # the first epoch is the warm-up
    rates = [examples / seconds for seconds, examples in timed]
    return {"ranks": n, "examples_per_s": round(statistics.median(rates), 1),
            "epoch_seconds": [round(s, 3) for s, _ in epochs], "test_accuracy": result["test_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--ranks", default="1,2", help="comma-separated Ns (default: 1,2)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per N, the first a warm-up (default: 3)")
    ap.add_argument("--batch-size", type=int, default=128, help="the global batch, split over the ranks")
    ap.add_argument("--train-stride", type=int, default=5)
    ap.add_argument("--val-size", type=int, default=5000, help="validation images (default: 5000)")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--json", type=Path, help="write the report here too")
    args = ap.parse_args(argv)
    try:
        ns = [int(v) for v in args.ranks.split(",") if v.strip()]
    except ValueError:
        ns = []
    if not ns or min(ns) < 1 or args.epochs < 1:
        print("error: --ranks must be positive integers, e.g. 1,2,4, and --epochs at least 1", file=sys.stderr)
        return 2
    import torch

    visible = torch.cuda.device_count() if args.device == "cuda" else None
    report: dict = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if visible else None,
                    "visible_gpus": visible, "cpus": os.cpu_count(), "batch_size": args.batch_size,
                    "train_stride": args.train_stride, "epochs": args.epochs, "runs": [], "skipped": []}
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        for n in ns:
            if visible is not None and n > visible:
                line = f"N={n} skipped: {visible} GPU(s) visible"
                print(line, flush=True)
                report["skipped"].append(line)
                continue
            if args.batch_size % n:
                report["skipped"].append(f"N={n} skipped: it does not divide batch size {args.batch_size}")
                print(report["skipped"][-1], flush=True)
                continue
            run = measure(n, args, Path(tmp))
            report["runs"].append(run)
    one = next((r["examples_per_s"] for r in report["runs"] if r["ranks"] == 1), None)
    for run in report["runs"]:
        if one:
            run["speedup"] = round(run["examples_per_s"] / one, 3)
            run["scaling_efficiency"] = round(run["examples_per_s"] / (run["ranks"] * one), 3)
        print(f"N={run['ranks']}: {run['examples_per_s']:.0f} examples/s"
              + (f", x{run['speedup']:.2f} of one rank, scaling efficiency {run['scaling_efficiency']:.0%}" if one else ""),
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
