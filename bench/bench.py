"""Benchmark: the W&B tutorial's pipeline against ours (`app.train.train`), same data, same config.

    .venv/bin/python bench/bench.py                           # table on stdout; ~20 min on a 2-core CPU
    .venv/bin/python bench/bench.py --json results.json       # the same numbers as JSON
    .venv/bin/python bench/bench.py --device cuda --variant amp=bf16 --variant compile=default

In one process and on the real Fashion-MNIST (copied from --source into a temporary data folder), each
repeat trains, from the same seed and with the tutorial's config (batch 128, lr 0.005, kernels [16, 32],
every 5th training image, 5 epochs):
  tutorial       bench/tutorial.py: DataLoader, 2 workers, per-image ToTensor, watch(log="all", log_freq=10)
  ours           app.train.train(config) as users run it, WANDB_MODE=offline, default watch settings
  ours-disabled  the same with WANDB_MODE=disabled: the difference is what W&B logging costs
  ours[k=v,...]  one row per --variant: ours with those config keys changed (offline)
  bare           (only when asked for) ours' loop alone: Batches + ConvNet + Adam, no run, no logging
The pipelines' order rotates between repeats so a drifting machine does not favour one of them.

Timing covers each training epoch's loop (data, forward, backward, step, logging); the first epoch of
every run is excluded as warm-up (allocator, cuDNN autotuning, torch.compile). On CUDA an epoch is timed
between CUDA events, read after synchronize. Ours is timed by train() itself (its loop's time, after a
device synchronize, handed to the `on_epoch` hook that offline sweeps use), so the code measured is
exactly the code users run. Test accuracy
is on all 10 000 test images after the same number of epochs. Ratios are taken within a repeat (the
runs of one repeat are minutes apart) and reported as median [min, max] over repeats.

On CUDA (or with --full-epoch / --agents on any device) it also measures ours on the full 60 000-image
training set (train_stride=1), and N agent processes training at once on the one device: their
aggregate examples/s and each one's peak memory (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

# the repository root, so `app` imports from a plain checkout too (no editable install, e.g. on a GPU box),
# and this folder, for `tutorial` however this file was loaded
sys.path[1:1] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from cpushare import NOISY, CpuShare, wait_until_idle  # noqa: E402

from app import data  # noqa: E402
from app.config import Config, ConfigError  # noqa: E402
from app.errors import UserError  # noqa: E402
from app.tracking import environment  # noqa: E402

# The tutorial's config (its `config` dict), used by every pipeline.
TUTORIAL = dict(epochs=5, classes=10, kernels=[16, 32], batch_size=128, learning_rate=0.005,
                dataset="fashion_mnist", architecture="CNN", train_stride=5)
SOURCE = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
WARMUP_EPOCHS = 1  # excluded from every run's examples/s
AGENT_START_TIMEOUT_S = 600  # agents wait this long at most for each other before their timed epochs
TARGETS = {  # issue 6
    "cpu": {"speedup": 1.8, "wandb_overhead": 0.03},
    "cuda": {"speedup": 40.0, "wandb_overhead": 0.03, "full_epoch_s": 0.25},
}


class BenchError(UserError):
    pass


# --- timing -------------------------------------------------------------------------------------


@dataclass
class Epoch:
    seconds: float  # training loop only
    examples: int
    start: float  # time.perf_counter() (CLOCK_MONOTONIC: comparable across processes) at start and end
    end: float
    others_cpu: float | None = None  # share of all CPUs that other processes used meanwhile (see CpuShare)
    own_cpu_s: float | None = None  # CPU seconds of this process and its children (workers, W&B service)


class EpochTimer:
    """Times training epochs: perf_counter on the CPU; on CUDA, CUDA events read after synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.epochs: list[Epoch] = []

    def start(self) -> None:
        self._share = CpuShare()  # reads /proc (a few ms): before the clock starts
        if self.cuda:
            torch.cuda.synchronize()
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        self._t0 = time.perf_counter()

    def record(self, seconds: float, examples: int) -> None:
        """An epoch timed elsewhere (train() times its own loop): the CPU-share window runs from the
        previous record (or `start`) to now, so it also covers that epoch's validation and checkpoint."""
        end = time.perf_counter()
        others, own = self._share.measure()
        self.epochs.append(Epoch(seconds, examples, end - seconds, end, others, own))
        self._share = CpuShare()

    def stop(self, examples: int) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            seconds = self._begin.elapsed_time(end) / 1000.0
        t1 = time.perf_counter()
        others, own = self._share.measure()
        self.epochs.append(Epoch(seconds if self.cuda else t1 - self._t0, examples, self._t0, t1, others, own))

    def steady(self) -> list[Epoch]:
        return self.epochs[WARMUP_EPOCHS:]

    def rate(self) -> float:
        """examples/s over the epochs after warm-up."""
        steady = self.steady()
        if not steady:
            raise BenchError(f"no epoch left after excluding {WARMUP_EPOCHS} warm-up epoch(s): use --epochs 2 or more")
        return sum(e.examples for e in steady) / sum(e.seconds for e in steady)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send everything this process (and what it starts) writes to stdout/stderr into `path`.

    At the descriptor level: train() prints progress and W&B hints, and W&B's service process
    inherits the descriptors; the benchmark's own output is the table.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])


# --- the pipelines --------------------------------------------------------------------------------


@dataclass
class Run:
    pipeline: str
    repeat: int
    examples_per_s: float
    test_accuracy: float
    epochs: list[Epoch]
    wall_s: float  # the whole run: data, model, training, test (and for ours, checkpoints + ONNX export)
    others_cpu: float | None  # share of all CPUs other processes used during the timed epochs: > 0.1 is noisy


def wandb_env(mode: str, work: Path) -> dict[str, str]:
    return dict(WANDB_MODE=mode, WANDB_DIR=str(work / "runs"), WANDB_PROJECT="bench", WANDB_SILENT="true")


def run_tutorial(settings: dict, data_dir: Path, device: torch.device, seed: int, work: Path) -> tuple[EpochTimer, float]:
    import tutorial
    import wandb

    torch.manual_seed(seed)  # model init and the DataLoader's shuffling
    timer = EpochTimer(device)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    with environment(**wandb_env("offline", work)):
        with wandb.init(project="bench", config=settings, dir=str(work / "runs"), mode="offline") as run:
            model, train_loader, test_loader, criterion, optimizer = tutorial.make(settings, str(data_dir), device)
            tutorial.train(model, train_loader, criterion, optimizer, settings, run, device,
                           on_epoch_start=lambda epoch: timer.start(), on_epoch_end=lambda epoch, n: timer.stop(n))
            accuracy = tutorial.test(model, test_loader, run, device)
    return timer, accuracy


def ours_config(settings: dict, data_dir: Path, device: torch.device, seed: int, work: Path, changes: dict) -> Config:
    # the defaults' val_size: with train_stride > 1 ours trains on exactly the tutorial's images (every 5th
    # of all 60 000) and validates on images that stride leaves out
    cfg = Config().replace(**settings, seed=seed, device=str(device),
                           data_dir=str(data_dir), output_dir=str(work / "outputs"), resume=False)
    return cfg.replace(**changes)


def run_ours(cfg: Config, wandb_mode: str, work: Path, before_epoch=None) -> tuple[EpochTimer, float]:
    """train(cfg) as users run it; its own per-epoch loop time comes back through `on_epoch`.
    `before_epoch(index)` runs before each epoch after the first (agents line their timed epochs up)."""
    from app.train import train

    timer = EpochTimer(torch.device(cfg.device))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
        timer.record(metrics["epoch_seconds"], int(metrics["examples"]))
        if before_epoch is not None and epoch + 1 < cfg.epochs:
            before_epoch(epoch + 1)
        return False  # never stop early

    timer.start()
    with environment(**wandb_env(wandb_mode, work)):
        result = train(cfg, os.environ, on_epoch=on_epoch)
    if len(timer.epochs) != cfg.epochs:
        raise RuntimeError(f"timed {len(timer.epochs)} of {cfg.epochs} epochs")
    return timer, result["test_accuracy"]


@dataclass
class Loop:
    """train()'s training loop without its run: train()'s setup (device, data, batches), the model and the
    step (the CUDA graph where train() would replay one)."""
    setup: Any  # app.train.Setup
    model: torch.nn.Module
    criterion: torch.nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bare_loop(cfg: Config) -> Loop:
    """train()'s own setup (device, seeds, data, batches), model and step."""
    from app.step import build_model, make_steps
    from app.train import setup

    s = setup(cfg)
    model, optimizer = build_model(cfg, s.device)
    criterion = torch.nn.CrossEntropyLoss()
    _, step = make_steps(model, optimizer, criterion, cfg, s.device, s.ds.train, s.fmt, contextlib.nullcontext)
    return Loop(s, model, criterion, step)


def run_bare(cfg: Config) -> tuple[EpochTimer, float]:
    """Ours without train()'s run, logging, checkpoints or progress: the loop's ceiling on this device."""
    from app.step import evaluate

    loop = bare_loop(cfg)
    timer = EpochTimer(loop.setup.device)
    for _ in range(cfg.epochs):
        timer.start()
        for x, y in loop.setup.train:
            loop.step(x, y)
        timer.stop(len(loop.setup.ds.train))
    _, accuracy = evaluate(loop.model, loop.setup.test, loop.criterion, contextlib.nullcontext)
    return timer, accuracy


@dataclass
class Pipeline:
    name: str
    kind: str  # tutorial | ours | bare
    wandb_mode: str
    changes: dict = field(default_factory=dict)  # config keys a --variant changes


def parse_variant(text: str) -> dict[str, str]:
    changes = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise BenchError(f"--variant {text!r}: expected KEY=VALUE[,KEY=VALUE], e.g. amp=bf16,compile=default")
        changes[key.strip()] = value.strip()
    return changes


def run_pipeline(p: Pipeline, settings: dict, data_dir: Path, device: torch.device, repeat: int, work: Path,
                 fresh_process: bool = False) -> Run:
    log = work / "logs" / f"{p.name}-{repeat}.log"
    try:
        if fresh_process:
            return run_in_fresh_process(p, settings, data_dir, device, repeat, work, log)
        with output_to(log):
            return _run_pipeline(p, settings, data_dir, device, repeat, work)
    except BaseException:
        tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
        print(f"{p.name} (repeat {repeat + 1}) failed; the end of its output:", *tail, sep="\n", file=sys.stderr)
        raise


def _run_pipeline(p: Pipeline, settings: dict, data_dir: Path, device: torch.device, repeat: int, work: Path) -> Run:
    t0 = time.perf_counter()
    if p.kind == "tutorial":
        timer, accuracy = run_tutorial(settings, data_dir, device, repeat, work)
    elif p.kind == "bare":
        timer, accuracy = run_bare(ours_config(settings, data_dir, device, repeat, work, p.changes))
    else:
        cfg = ours_config(settings, data_dir, device, repeat, work, p.changes)
        timer, accuracy = run_ours(cfg, p.wandb_mode, work)
    shares = [e.others_cpu for e in timer.steady() if e.others_cpu is not None]
    others = sum(shares) / len(shares) if shares else None
    return Run(p.name, repeat, timer.rate(), accuracy, timer.epochs, time.perf_counter() - t0, others)


def _fresh_child(pipeline: dict, settings: dict, data_dir: str, device: str, repeat: int, work: str, log: str,
                 results) -> None:
    # a spawned child inherits "spawn" as its default start method; a user's fresh process has the
    # platform's (fork on Linux), and the tutorial's DataLoader starts its workers with it every epoch
    multiprocessing.set_start_method(None, force=True)
    try:
        with output_to(Path(log)):
            run = _run_pipeline(Pipeline(**pipeline), settings, Path(data_dir), torch.device(device), repeat, Path(work))
        results.put({"index": 0, "run": asdict(run)})
    except BaseException as exc:  # reported by the parent
        results.put({"index": 0, "error": f"{type(exc).__name__}: {exc}"})


def run_in_fresh_process(p: Pipeline, settings: dict, data_dir: Path, device: torch.device, repeat: int, work: Path,
                         log: Path) -> Run:
    """One run in a new Python process, as users start every run: nothing warmed up by earlier runs
    (the C allocator's heap, W&B's service, imports) carries over."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_fresh_child, args=(asdict(p), settings, str(data_dir), str(device), repeat, str(work),
                                                  str(log), results))
    proc.start()
    got = collect(results, [proc])[0]
    if "error" in got:
        raise RuntimeError(got["error"])
    fields = got["run"]
    return Run(**dict(fields, epochs=[Epoch(**e) for e in fields["epochs"]]))


def collect(results, procs: list) -> list[dict]:
    """One result per process from `results`; a process that dies without one is an error, not a hang."""
    got = []
    try:
        while len(got) < len(procs):
            try:
                got.append(results.get(timeout=5))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(f"process(es) {dead} exited with {[procs[i].exitcode for i in dead]} without a result")
        for p in procs:
            p.join()
    finally:
        for p in procs:  # e.g. agents waiting at the barrier for one that died
            if p.is_alive():
                p.terminate()
    return sorted(got, key=lambda g: g["index"])


# --- agents sharing one device -----------------------------------------------------------------


def _agent(index: int, cfg: dict, work: str, start, results) -> None:
    """One agent process: what `wandb agent` starts per trial, i.e. one train() of ours."""
    try:
        config = Config().replace(**cfg)
        device = torch.device(config.device)

        def before_epoch(i: int) -> None:
            if i == WARMUP_EPOCHS:  # the timed epochs of all agents start together, whatever their start-up took
                start.wait(timeout=AGENT_START_TIMEOUT_S)

        with output_to(Path(work) / "logs" / f"agent{index}.log"):
            timer, accuracy = run_ours(config, "offline", Path(work) / f"agent{index}", before_epoch)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
        results.put({"index": index, "epochs": [asdict(e) for e in timer.epochs], "examples_per_s": timer.rate(),
                     "test_accuracy": accuracy, "max_memory_allocated": peak, "max_memory_reserved": reserved})
    except BaseException as exc:  # reported by the parent; a traceback in a child is easy to miss
        results.put({"index": index, "error": f"{type(exc).__name__}: {exc}"})


def run_agents(n: int, cfg: Config, work: Path) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    start, results = ctx.Barrier(n), ctx.Queue()
    share = CpuShare()
    procs = [ctx.Process(target=_agent, args=(i, cfg.to_dict(), str(work), start, results)) for i in range(n)]
    for p in procs:
        p.start()
    got = collect(results, procs)
    errors = [f"agent {g['index']}: {g['error']}" for g in got if "error" in g]
    if errors:
        raise RuntimeError("; ".join(errors))
    steady = [[Epoch(**e) for e in g["epochs"][WARMUP_EPOCHS:]] for g in got]
    first, last = min(s[0].start for s in steady), max(s[-1].end for s in steady)
    common = min(s[-1].end for s in steady) - max(s[0].start for s in steady)
    return {
        "agents": n,
        # all steady-state examples over the span from the first agent's start to the last one's end
        "aggregate_examples_per_s": sum(e.examples for s in steady for e in s) / (last - first),
        "sum_of_agent_examples_per_s": sum(g["examples_per_s"] for g in got),
        "overlap": max(common, 0.0) / (last - first),  # 1.0: all agents trained the whole span at once
        "others_cpu": share.others(),
        "per_agent": [{k: g[k] for k in ("examples_per_s", "test_accuracy", "max_memory_allocated", "max_memory_reserved")}
                      for g in got],
    }


# --- statistics, table, JSON --------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torchvision
    import wandb

    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "wandb": wandb.__version__, "platform": platform.platform(),
    }


def quiet_rate(epochs: list[Epoch]) -> dict[str, Any] | None:
    quiet = [e for e in epochs if e.others_cpu is not None and e.others_cpu < NOISY]
    if not quiet:
        return None
    return {"examples_per_s": sum(e.examples for e in quiet) / sum(e.seconds for e in quiet), "epochs": len(quiet),
            "of": len(epochs)}


def summarize(runs: list[Run], pipelines: list[Pipeline], repeats: int) -> dict[str, Any]:
    by = {p.name: {r.repeat: r for r in runs if r.pipeline == p.name} for p in pipelines}
    out: dict[str, Any] = {"pipelines": {}, "ratios": {}}
    for p in pipelines:
        rs = [by[p.name][i] for i in range(repeats)]
        out["pipelines"][p.name] = {
            "kind": p.kind, "wandb_mode": p.wandb_mode, "changes": p.changes,
            "examples_per_s": spread([r.examples_per_s for r in rs]),
            "test_accuracy": spread([r.test_accuracy for r in rs]),
            "epoch_seconds": [[e.seconds for e in r.epochs] for r in rs],
            # CPU seconds per 1000 training examples, this process and its children: the work, not the waiting
            "cpu_s_per_1k_examples": spread([1000 * sum(e.own_cpu_s for e in r.epochs[WARMUP_EPOCHS:]) /
                                             sum(e.examples for e in r.epochs[WARMUP_EPOCHS:]) for r in rs])
            if all(e.own_cpu_s is not None for r in rs for e in r.epochs) else None,
            "run_wall_s": [r.wall_s for r in rs],
            "others_cpu": [r.others_cpu for r in rs],
            "epoch_others_cpu": [[e.others_cpu for e in r.epochs] for r in rs],
            # the steady epochs of all repeats during which other processes stayed under NOISY: the best
            # estimate of this pipeline on an idle machine (None when no epoch was that quiet)
            "quiet_examples_per_s": quiet_rate([e for r in rs for e in r.epochs[WARMUP_EPOCHS:]]),
        }

    def per_repeat(a: str, b: str, f) -> dict[str, Any] | None:
        if a not in by or b not in by:
            return None
        return spread([f(by[a][i], by[b][i]) for i in range(repeats)])

    ratios = out["ratios"]
    for p in pipelines:
        if p.kind in ("ours", "bare"):
            ratios[f"speedup {p.name}"] = per_repeat(p.name, "tutorial", lambda x, t: x.examples_per_s / t.examples_per_s)
            ratios[f"accuracy delta {p.name}"] = per_repeat(p.name, "tutorial", lambda x, t: x.test_accuracy - t.test_accuracy)
    # extra training time with W&B logging on (offline) relative to off (disabled)
    ratios["wandb_overhead"] = per_repeat("ours", "ours-disabled", lambda on, off: off.examples_per_s / on.examples_per_s - 1)
    out["ratios"] = {k: v for k, v in ratios.items() if v is not None}
    return out


def verdicts(report: dict, device: torch.device) -> dict[str, Any]:
    targets = TARGETS["cuda" if device.type == "cuda" else "cpu"]
    r = report["ratios"]
    out: dict[str, Any] = {}
    if "speedup ours" in r:
        out["speedup"] = {"target": f">= {targets['speedup']}x", "measured": r["speedup ours"]["median"],
                          "met": r["speedup ours"]["median"] >= targets["speedup"]}
        # seeds move test accuracy by ~0.5 %: "equal" means not worse by more than two standard errors
        deltas = r["accuracy delta ours"]["values"]
        mean = statistics.mean(deltas)
        margin = 2 * statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else 0.0
        out["accuracy"] = {"target": "ours - tutorial >= 0 within 2 standard errors (paired by seed)",
                           "measured": mean, "two_se": margin, "met": mean + margin >= 0}
    if "wandb_overhead" in r:
        out["wandb_overhead"] = {"target": f"<= {targets['wandb_overhead']:.0%}", "measured": r["wandb_overhead"]["median"],
                                 "met": r["wandb_overhead"]["median"] <= targets["wandb_overhead"]}
    if report.get("full_epoch") and "full_epoch_s" in targets:
        seconds = report["full_epoch"]["epoch_seconds"]["median"]
        out["full_epoch"] = {"target": f"<= {targets['full_epoch_s']} s", "measured": seconds,
                             "met": seconds <= targets["full_epoch_s"]}
    return out


def fmt_spread(s: dict, f: str) -> str:
    return f"{s['median']:{f}} [{s['min']:{f}}, {s['max']:{f}}]"


def quiet_text(q: dict | None) -> str:
    return f"{q['examples_per_s']:.0f} ({q['epochs']} of {q['of']})" if q else "none quiet"


def table(report: dict) -> str:
    st, lines = report["settings"], []
    m = report["machine"]
    lines.append(f"Fashion-MNIST, batch {st['batch_size']}, lr {st['learning_rate']}, kernels {st['kernels']}, "
                 f"train_stride {st['train_stride']} ({st['train_examples']} training images), {st['epochs']} epochs, "
                 f"{st['warmup']}, {st['repeats']} repeat(s)")
    lines.append(f"device {st['device']}: {m['gpu'] or m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads), "
                 f"torch {m['torch']}, wandb {m['wandb']}")
    lines.append("")
    head = (f"{'pipeline':<28} {'W&B':<9} {'examples/s median [min, max]':<30} {'vs tutorial':<22} "
            f"{'test accuracy median [min, max]':<33} {'others CPU':<11} quiet epochs: examples/s")
    lines += [head, "-" * len(head)]
    ratios = report["ratios"]
    for name, p in report["pipelines"].items():
        speed = ratios.get(f"speedup {name}")
        vs = fmt_spread(speed, ".2f") if speed else ("1.00" if name == "tutorial" else "-")
        shares = [x for x in p["others_cpu"] if x is not None]
        lines.append(f"{name:<28} {p['wandb_mode']:<9} {fmt_spread(p['examples_per_s'], '.0f'):<30} {vs:<22} "
                     f"{fmt_spread(p['test_accuracy'], '.4f'):<33} {f'max {max(shares):.0%}' if shares else '-':<11} "
                     f"{quiet_text(p['quiet_examples_per_s'])}")
    lines.append("")
    if "wandb_overhead" in ratios:
        lines.append(f"W&B overhead (ours, offline vs disabled, training time): {fmt_spread(ratios['wandb_overhead'], '+.1%')}")
    fe = report.get("full_epoch")
    if fe:
        lines.append(f"full 60000-image epoch (ours, train_stride={fe['train_stride']}, scaled to 60000): "
                     f"{fmt_spread(fe['epoch_seconds'], '.3f')} s, "
                     f"{fmt_spread(fe['examples_per_s'], '.0f')} examples/s")
    ag = report.get("agents")
    if ag:
        mem = [a["max_memory_allocated"] for a in ag["per_agent"]]
        mem_text = f", peak memory per agent {max(mem) / 2**20:.0f} MiB (max_memory_allocated)" if mem[0] is not None else ""
        lines.append(f"{ag['agents']} agents on one device: {ag['aggregate_examples_per_s']:.0f} examples/s together "
                     f"(sum of each agent's rate {ag['sum_of_agent_examples_per_s']:.0f}, overlap {ag['overlap']:.0%})"
                     f"{mem_text}")
    for name, v in report["targets"].items():
        value = {"wandb_overhead": f"{v['measured']:+.1%} (median)",
                 "accuracy": f"{v['measured']:+.4f} ± {v.get('two_se', 0):.4f} (mean ± 2 SE)",
                 "speedup": f"{v['measured']:.2f}x (median)"}.get(name, f"{v['measured']:.3g}")
        lines.append(f"target {name}: {v['target']}, measured {value} -> {'met' if v['met'] else 'MISSED'}")
    shares = [x for p in report["pipelines"].values() for x in p["others_cpu"] if x is not None]
    if shares and max(shares) > NOISY:
        lines.append(f"note: other processes used up to {max(shares):.0%} of the CPUs during these runs (median "
                     f"{statistics.median(shares):.0%}): the machine was shared and the numbers are noisy; "
                     "rerun when it is idle (--wait-idle)")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------


def prepare_data(args, work: Path) -> Path:
    """A torchvision data root with the four Fashion-MNIST files, unpacked (`data.ensure`)."""
    if args.data_dir:
        root = Path(args.data_dir)
    else:
        source = Path(args.source)
        archives = [source / f"{name}.gz" for name in data.FILES]
        missing = [a.name for a in archives if not a.exists()]
        if missing:
            raise BenchError(f"--source {source}: missing {', '.join(missing)} "
                             "(apt-get install dataset-fashion-mnist, or point --source/--data-dir at a copy)")
        root = work / "data"
        raw = data.raw_folder(root, "fashion_mnist")
        raw.mkdir(parents=True)
        for a in archives:
            shutil.copy(a, raw / a.name)
    data.ensure("fashion_mnist", root)
    return root


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--device", default="auto", help="auto (cuda if visible) | cpu | cuda | cuda:N (default: auto)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each pipeline (default: 3)")
    ap.add_argument("--epochs", type=int, default=TUTORIAL["epochs"], help="epochs per run, the first is warm-up (default: 5)")
    ap.add_argument("--train-stride", type=int, default=TUTORIAL["train_stride"],
                    help="train on every Nth training image (default: the tutorial's 5)")
    ap.add_argument("--pipelines", default="tutorial,ours,ours-disabled",
                    help="comma-separated, from tutorial,ours,ours-disabled,bare (default: the first three; bare = "
                         "ours' loop alone, without train()'s W&B run, checkpoints or progress)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="an extra row: ours with these config keys changed, e.g. amp=bf16,compile=default (repeatable)")
    ap.add_argument("--full-epoch", action=argparse.BooleanOptionalAction, default=None,
                    help="also time ours on all 60000 training images (default: on for CUDA)")
    ap.add_argument("--agents", type=int, default=None, help="also run N agent processes at once on the device (default: 4 on CUDA, else 0)")
    ap.add_argument("--agent-epochs", type=int, default=5, help="epochs per agent, the first is warm-up (default: 5)")
    ap.add_argument("--full-stride", type=int, default=1,
                    help="train_stride of --full-epoch and --agents (default: 1, all 60000 images; larger for smoke tests)")
    ap.add_argument("--fresh-process", action="store_true",
                    help="run every run in a new Python process, as users start each run (default: all in this one)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each run, wait up to SECONDS for 5 s in which other processes use < 10%% of the CPUs "
                         "(for shared machines; default: 0, don't wait)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--source", default=SOURCE, help=f"folder with the four Fashion-MNIST .gz files (default: {SOURCE})")
    ap.add_argument("--data-dir", help="use this torchvision data root (with FashionMNIST/raw) instead of copying --source")
    ap.add_argument("--work-dir", help="keep runs, outputs and data here (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    for name in ("repeats", "epochs", "train_stride", "agent_epochs", "full_stride"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.epochs <= WARMUP_EPOCHS or args.agent_epochs <= WARMUP_EPOCHS:
        ap.error(f"--epochs and --agent-epochs must be > {WARMUP_EPOCHS}: the first epoch is warm-up and not timed")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"--device {name!r} must be auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: no CUDA device is visible")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {name!r} must be auto, cpu, cuda or cuda:N")
    return device


def build_pipelines(args) -> list[Pipeline]:
    known = {"tutorial": Pipeline("tutorial", "tutorial", "offline"), "ours": Pipeline("ours", "ours", "offline"),
             "ours-disabled": Pipeline("ours-disabled", "ours", "disabled"), "bare": Pipeline("bare", "bare", "none")}
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise BenchError(f"--pipelines {args.pipelines!r}: choose from {', '.join(known)}")
    pipelines = [known[n] for n in names]
    for text in args.variant:
        changes = parse_variant(text)
        pipelines.append(Pipeline(f"ours[{text}]", "ours", "offline", changes))
    return pipelines


def bench(args) -> dict[str, Any]:
    device = resolve_device(args.device)
    pipelines = build_pipelines(args)
    settings = dict(TUTORIAL, epochs=args.epochs, train_stride=args.train_stride)
    full_epoch = args.full_epoch if args.full_epoch is not None else device.type == "cuda"
    agents = args.agents if args.agents is not None else (4 if device.type == "cuda" else 0)
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        work.mkdir(parents=True, exist_ok=True)
        for p in pipelines:  # a bad --variant fails now, not after minutes of measuring
            try:
                ours_config(settings, work / "data", device, 0, work, p.changes)
            except ConfigError as exc:
                raise BenchError(f"--variant {p.name[5:-1]}: {exc}") from None
        data_dir = prepare_data(args, work)

        runs: list[Run] = []
        for repeat in range(args.repeats):
            shift = repeat % len(pipelines)
            for p in pipelines[shift:] + pipelines[:shift]:
                if args.wait_idle:
                    wait_until_idle(args.wait_idle)
                run = run_pipeline(p, settings, data_dir, device, repeat, work, args.fresh_process)
                others = "-" if run.others_cpu is None else f"{run.others_cpu:.0%}"
                print(f"repeat {repeat + 1}/{args.repeats} {p.name:<24} {run.examples_per_s:8.0f} examples/s  "
                      f"test_accuracy {run.test_accuracy:.4f}  others' CPU {others}", file=sys.stderr, flush=True)
                runs.append(run)
        report: dict[str, Any] = {
            "machine": machine(device),
            "settings": dict(settings, device=str(device), repeats=args.repeats, fresh_process=args.fresh_process,
                             train_examples=len(range(0, 60000, args.train_stride)),
                             warmup=f"first {WARMUP_EPOCHS} epoch of each run excluded",
                             timing="CUDA events + synchronize" if device.type == "cuda" else "time.perf_counter"),
            **summarize(runs, pipelines, args.repeats),
        }

        if full_epoch:
            full = Pipeline("ours", "ours", "offline", {"train_stride": str(args.full_stride)})
            fulls = [run_pipeline(full, settings, data_dir, device, r, work, args.fresh_process)
                     for r in range(args.repeats)]
            report["full_epoch"] = {
                "train_stride": args.full_stride,
                "epoch_seconds": spread([statistics.median(e.seconds * 60000 / e.examples for e in r.epochs[WARMUP_EPOCHS:])
                                         for r in fulls]),
                "examples_per_s": spread([r.examples_per_s for r in fulls]),
                "test_accuracy": spread([r.test_accuracy for r in fulls]),
            }
            print(f"full epoch: {report['full_epoch']['epoch_seconds']['median']:.3f} s", file=sys.stderr, flush=True)
        if agents:
            cfg = ours_config(dict(settings, epochs=args.agent_epochs, train_stride=args.full_stride), data_dir, device, 0, work, {})
            report["agents"] = run_agents(agents, cfg, work / "agents")
        report["targets"] = verdicts(report, device)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = bench(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
