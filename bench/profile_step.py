"""What bounds one training step: torch.profiler over train()'s own loop (data, step) on this device.

    .venv/bin/python bench/profile_step.py --device cuda --json profile.json
    .venv/bin/python bench/profile_step.py --device cpu --steps 5 --source /usr/share/datasets/fashion-mnist

Builds the loop from train()'s setup (bench.bare_loop: the CUDA graph where train() replays one), warms it
up, then times `--steps` steps three ways: the whole iteration (gather + normalise + step, as train()
runs it), the step alone on pre-made batches, and the data part alone; and profiles the whole iteration.
Reported: ms per step of each, the profiler's top operators by self device time (CUDA) or self CPU time,
and how many kernels and CPU-side operators one step launches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[1:1] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench import SOURCE, TUTORIAL, BenchError, bare_loop, ours_config, prepare_data, resolve_device  # noqa: E402

from app.errors import UserError  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_step_ms(fn, steps: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def profile(args) -> dict:
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        work = Path(tmp)
        data_dir = prepare_data(args, work)
        cfg = ours_config(dict(TUTORIAL, train_stride=args.train_stride), data_dir, device, 0, work, {})
        loop = bare_loop(cfg)
        batches = loop.setup.train
        stream = iter(())

        def next_batch():
            nonlocal stream
            try:
                return next(stream)
            except StopIteration:
                stream = iter(batches)
                return next(stream)

        def whole():
            x, y = next_batch()
            loop.step(x, y)

        fixed = [next_batch() for _ in range(4)]
        i = 0

        def step_only():
            nonlocal i
            loop.step(*fixed[i % len(fixed)])
            i += 1

        for _ in range(args.warmup):
            whole()
        result = {
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "steps": args.steps, "step_kind": type(loop.step).__name__,
            "ms_per_step": {"whole": per_step_ms(whole, args.steps, device),
                            "step_only": per_step_ms(step_only, args.steps, device),
                            "data_only": per_step_ms(next_batch, args.steps, device)},
        }
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                whole()
            _sync(device)
        events = prof.key_averages()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:args.top]
        result["top"] = [{"name": e.key, "calls_per_step": e.count / args.steps,
                          "self_cpu_us_per_step": e.self_cpu_time_total / args.steps,
                          "self_device_us_per_step": getattr(e, "self_device_time_total", 0) / args.steps}
                         for e in top]
        result["cpu_ops_per_step"] = sum(e.count for e in events if e.key.startswith("aten::")) / args.steps
        if device.type == "cuda":
            kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
            result["kernels_per_step"] = sum(e.count for e in kernels) / args.steps
            result["device_busy_us_per_step"] = sum(e.self_device_time_total for e in kernels) / args.steps
        result["table"] = events.table(sort_by=key, row_limit=args.top)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--train-stride", type=int, default=TUTORIAL["train_stride"])
    ap.add_argument("--source", default=SOURCE)
    ap.add_argument("--data-dir")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    try:
        result = profile(args)
    except (UserError, BenchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.pop("table") if not args.json else result["table"])
    print(" ".join(f"{k} {v:.3f} ms/step" for k, v in result["ms_per_step"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
