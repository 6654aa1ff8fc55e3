"""Benchmark the image: its size beyond torch's own packages, and `docker run` to the first training step.

    python3 bench/container.py                                  # mnist-sweeps:test, 5 runs; ~2 min on 2 cores
    python3 bench/container.py --image mnist-sweeps:latest --base nvidia/cuda:13.0.1-base-ubuntu24.04
    python3 bench/container.py --repeats 8 --wait-idle 60 --json container.json

Needs only Python 3 and the docker CLI with an engine: everything that reads the image or a run's record
runs inside the image itself (`docker run --entrypoint python IMAGE -c ...`).

Size. `docker image inspect`'s Size (the sum of the image's layers, as `docker images` shows it, in
decimal MB) minus "torch's own packages": the files listed in the RECORD of torch, torchvision and every
distribution they require, recursively, with the extras they ask for (torch's `cuda-toolkit[cublas,...]`
brings the CUDA libraries); extras nobody asks for and requirements whose markers do not hold inside the
image are skipped. Files are summed the way the engine sums a layer (st_size of each non-directory, hard
links once). What is left is what this project adds on top of PyTorch: the base image, W&B, onnx, ... .
`--base` (the Dockerfile's FROM image) splits that into the base and our own layers; the base must be
the image's base (its layers a prefix of the image's).

Startup. Each repeat runs the image as users do (default entrypoint, `-e ALLOW_CPU=1`, offline W&B, the
real Fashion-MNIST in a data volume) with LOG_INTERVAL=1, so the run records a `loss` history row right
after the first optimizer step. Startup = that row's `_timestamp` (wall clock, written by wandb.log in the
container) minus host time.time() just before `docker run`; the host and the container share one clock.
The run's own record, read with app.runlog, also splits it:
  docker run -> process    the engine: create, network, mounts, start (State.StartedAt)
  process -> wandb.init    interpreter, imports, settings, unpacking the dataset on a cold run
  wandb.init               wandb.init itself (from the row's _runtime, and debug.log's "returning control")
  init -> first step       reading the dataset (torchvision, whose import brings torch._dynamo), the
                           model and optimizer, watch, the first step and its log
Repeat 1 is cold: a fresh data volume holding only the four .gz archives (the run unpacks them, as a
user's first run does). Later repeats are warm: they reuse the unpacked data, as a user's next run does,
each with fresh runs/ and outputs/ volumes. The target applies to the warm median. The OS page cache is
not dropped (that would slow everyone else on the machine): even repeat 1 may find the image's files in
memory if the image ran recently.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cpushare import NOISY, others_over, wait_until_idle  # this folder: run as a script

IMAGE = "mnist-sweeps:test"  # what scripts/build-image --tag and the tests build
BASE = "mnist-sweeps-base:bookworm"  # the tests' debootstrap stand-in for the CUDA base
SOURCE = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
ARCHIVES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# A tiny real run: one epoch of ~1000 images; LOG_INTERVAL=1 logs `loss` after the very first step.
RUN_ENV = {"ALLOW_CPU": "1", "WANDB_MODE": "offline", "DATASET": "fashion_mnist", "LOG_INTERVAL": "1",
           "EPOCHS": "1", "TRAIN_STRIDE": "60", "VAL_SIZE": "1000"}
TORCH_ROOTS = ("torch", "torchvision")  # "torch's own packages": these and everything they require
IMAGE_UID = 1000  # the image's user (Dockerfile: USER 1000:1000)
MB = 1e6  # decimal, as `docker images` prints sizes
TARGETS = {"beyond_torch_mb": 400.0, "startup_warm_s": 5.0}  # issue 6
RUN_TIMEOUT_S = 600  # one tiny training run in a container


class BenchError(Exception):
    """A problem the user can fix: one `error:` line, exit code 2."""


class RunFailed(Exception):
    """The image under test failed: its output's tail, then exit code 1."""


# --- docker -------------------------------------------------------------------------------------


def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RunFailed(f"docker {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def check_engine() -> str:
    if shutil.which("docker") is None:
        raise BenchError("no docker client on PATH: install Docker (Debian: apt-get install docker.io)")
    proc = docker("info", "--format", "{{.ServerVersion}}", timeout=60, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        last = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        raise BenchError(f"the Docker engine does not answer ({last}): start it (systemctl start docker, or dockerd)")
    return proc.stdout.strip()


def inspect_image(name: str, option: str, hint: str) -> dict[str, Any]:
    proc = docker("image", "inspect", name, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{option} {name}: no such image here ({hint})")
    return json.loads(proc.stdout)[0]


def python_in(image: str, script: str, flags: tuple[str, ...] = (), args: tuple[str, ...] = (),
              timeout: float = 300) -> Any:
    """Run `script` with the image's python (not its entrypoint); it prints one JSON document."""
    proc = docker("run", "--rm", "--network=none", "--entrypoint", "python", *flags, image, "-c", script, *args,
                  timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RunFailed(f"python in {image} exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- size ---------------------------------------------------------------------------------------

# Runs inside the image. Sizes are summed like the engine's layer size (moby's directory.Size): st_size of
# every non-directory, hard links once. `packaging` may not be installed; pip's vendored copy always is.
SIZE_SCRIPT = r"""
import importlib.metadata as md, json, os, sys
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
dists, seen = {}, set()
for d in md.distributions():
    name = canonicalize_name(d.metadata["Name"])
    if name in dists:
        continue  # shadowed further down sys.path: not what `import` loads
    size = files = 0
    for f in d.files or []:
        try:
            st = os.lstat(d.locate_file(f))
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o040000 or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        size += st.st_size
        files += 1
    # each requirement that applies here, with the extra of this dist that asks for it ("" = always)
    extras = [""] + [canonicalize_name(e) for e in d.metadata.get_all("Provides-Extra") or []]
    requires = []
    for text in d.requires or []:
        req = Requirement(text)
        for extra in extras:
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                requires.append({"name": canonicalize_name(req.name), "when": extra,
                                 "extras": sorted(canonicalize_name(x) for x in req.extras)})
                break  # applies without the extra, or with the first extra that pulls it in
    dists[name] = {"name": d.metadata["Name"], "version": d.version, "bytes": size, "files": files,
                   "record": d.files is not None, "requires": requires}
print(json.dumps({"python": sys.version.split()[0], "prefix": sys.prefix, "dists": dists}))
"""


def closure(dists: dict[str, dict], roots: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Installed distributions reachable from `roots` through their requirements, following the extras
    each requirement asks for (torch's `cuda-toolkit[cublas,cufft,...]`); and required-but-absent ones."""
    found: dict[str, set[str]] = {}  # distribution -> the extras asked of it so far
    missing, todo = set(), [(r, "") for r in roots]
    while todo:
        name, extra = todo.pop()
        if name not in dists:
            missing.add(name)
            continue
        if extra in found.setdefault(name, set()):
            continue
        found[name].add(extra)
        for req in dists[name]["requires"]:
            if req["when"] == extra:
                todo += [(req["name"], x) for x in ["", *req["extras"]]]
    return sorted(found), sorted(missing)


def measure_size(image: str, image_info: dict, base: str | None, base_info: dict | None) -> dict[str, Any]:
    listing = python_in(image, SIZE_SCRIPT)
    dists = listing["dists"]
    absent = [r for r in TORCH_ROOTS if r not in dists]
    if absent:
        raise BenchError(f"--image {image}: {', '.join(absent)} not installed for the image's python ({listing['prefix']})")
    torch_names, missing = closure(dists, TORCH_ROOTS)
    image_bytes = image_info["Size"]
    torch_bytes = sum(dists[n]["bytes"] for n in torch_names)
    others = sorted((n for n in dists if n not in torch_names), key=lambda n: -dists[n]["bytes"])
    other_bytes = sum(dists[n]["bytes"] for n in others)
    base_bytes = base_info["Size"] if base_info else None
    return {
        "image": image, "image_id": image_info["Id"], "created": image_info.get("Created"),
        "image_bytes": image_bytes,
        "base": base, "base_bytes": base_bytes,
        "our_layers_bytes": image_bytes - base_bytes if base_bytes is not None else None,
        "python": listing["python"], "prefix": listing["prefix"],
        "torch_closure": [f"{dists[n]['name']}=={dists[n]['version']}" for n in torch_names],
        "torch_closure_missing": missing,
        "torch_closure_bytes": torch_bytes,
        "beyond_torch_bytes": image_bytes - torch_bytes,
        "other_dists_bytes": other_bytes,
        # base + other distributions + this = beyond torch: the venv's own files, /app, users, layer overlaps
        # (and the base itself when --base none)
        "rest_bytes": image_bytes - torch_bytes - other_bytes - (base_bytes or 0),
        "largest_other_dists": [{"name": dists[n]["name"], "version": dists[n]["version"], "bytes": dists[n]["bytes"]}
                                for n in others[:10]],
        "dists_without_record": sorted(dists[n]["name"] for n in dists if not dists[n]["record"]),
    }


# --- startup ------------------------------------------------------------------------------------

# Runs inside the image: the first `loss` row and how the run ended, from the run's own .wandb log.
READ_SCRIPT = r"""
import json, sys
from app import runlog
folders = runlog.find(sys.argv[1])
out = []
for folder in folders:
    run = runlog.read(folder)
    first = next((row for row in run.history if "loss" in row), None)
    debug = folder / "logs" / "debug.log"
    returned = [line for line in debug.read_text(errors="replace").splitlines()
                if "returning control to user process" in line] if debug.exists() else []
    out.append({"folder": str(folder), "run_id": run.run_id, "exit_code": run.exit_code, "rows": len(run.history),
                "first_loss_row": first, "init_returned_line": returned[0] if returned else None})
print(json.dumps(out))
"""

DEBUG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s")


def parse_started_at(text: str) -> float:
    """Docker's RFC 3339 UTC time with nanoseconds (2026-11-27T07:06:33.123456789Z) -> epoch seconds."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", text.strip())
    if not match:
        raise RunFailed(f"unexpected State.StartedAt {text!r}")
    whole = datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return whole + float("0." + (match[2] or "0"))


def parse_debug_time(line: str | None) -> float | None:
    """wandb's debug.log time (millisecond resolution, the container's local time: UTC unless TZ is set)."""
    match = DEBUG_TIME.match(line or "")
    if not match:
        return None
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=timezone.utc).timestamp()


def user_flags() -> list[str]:
    """As root the volumes are handed to the image's user (as a named volume would be); anyone else runs
    the image as themselves, as the compose file does with `user: UID:GID`."""
    return [] if os.getuid() == 0 else [f"--user={os.getuid()}:{os.getgid()}"]


def own(path: Path) -> Path:
    if os.getuid() == 0:
        for item in [path, *path.rglob("*")]:
            os.chown(item, IMAGE_UID, IMAGE_UID, follow_symlinks=False)
    return path


def check_source(source: Path) -> None:
    missing = [a for a in ARCHIVES if not (source / a).is_file()]
    if missing:
        raise BenchError(f"--source {source}: missing {', '.join(missing)} "
                         "(apt-get install dataset-fashion-mnist, or point --source at a copy)")


def prepare_data(source: Path, work: Path) -> Path:
    """A data volume as a user's first run finds it: torchvision's layout, only the four .gz archives."""
    check_source(source)
    raw = work / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for a in ARCHIVES:
        shutil.copyfile(source / a, raw / a)
    return own(work / "data")


def one_run(image: str, data_dir: Path, work: Path, repeat: int, kind: str, wait_idle: float) -> dict[str, Any]:
    runs, outputs = work / f"runs-{repeat}", work / f"outputs-{repeat}"
    runs.mkdir()
    outputs.mkdir()
    own(runs)
    own(outputs)
    # just before the run, while nothing of this benchmark runs: what others are using
    others = wait_until_idle(wait_idle, window_s=2.0) if wait_idle > 0 else others_over(1.0)
    name = f"bench-startup-{uuid.uuid4().hex[:12]}"
    command = ["docker", "run", f"--name={name}", *user_flags(),
               f"--volume={data_dir}:/data", f"--volume={runs}:/runs", f"--volume={outputs}:/outputs",
               *(f"--env={k}={v}" for k, v in RUN_ENV.items()), image]
    try:
        t0 = time.time()  # the user presses enter
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"repeat {repeat + 1}: the container ran past {RUN_TIMEOUT_S} s") from None
        t_exit = time.time()
        if proc.returncode != 0:
            raise RunFailed(f"repeat {repeat + 1}: the container exited with {proc.returncode}; the end of its output:\n"
                            + (proc.stdout + proc.stderr)[-3000:])
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
    finally:
        docker("rm", "--force", name, check=False)
    started = parse_started_at(state["StartedAt"])

    found = python_in(image, READ_SCRIPT, flags=(*user_flags(), f"--volume={runs}:/bench/runs:ro"), args=("/bench/runs",))
    if len(found) != 1:
        raise RunFailed(f"repeat {repeat + 1}: expected one offline run in the runs volume, found {len(found)}")
    (run,) = found
    row = run["first_loss_row"]
    if run["exit_code"] != 0 or row is None:
        raise RunFailed(f"repeat {repeat + 1}: run {run['run_id']} ended with exit code {run['exit_code']} "
                        f"and {'a' if row else 'no'} loss row")
    first_step = row["_timestamp"]
    init_start = first_step - row["_runtime"]
    init_returned = parse_debug_time(run["init_returned_line"])
    # debug.log is in the container's local time: trust it only where it falls inside wandb.init's window
    # (its millisecond truncation can put it up to 1 ms before the truth)
    if init_returned is not None and not init_start - 0.002 <= init_returned <= first_step:
        init_returned = None
    return {
        "repeat": repeat + 1, "data": kind, "run_id": run["run_id"],
        "total_s": first_step - t0,
        "docker_to_process_s": started - t0,
        "process_to_init_s": init_start - started,
        "init_s": init_returned - init_start if init_returned is not None else None,
        "init_to_first_step_s": first_step - (init_returned if init_returned is not None else init_start),
        "container_start_to_init_s": init_start - t0,  # the two-part split: docker run -> wandb.init begins
        "init_start_to_first_step_s": first_step - init_start,  # wandb.init begins -> first step
        "run_s": t_exit - t0,  # docker run until the container exited (the whole tiny run)
        "history_rows": run["rows"],
        "others_cpu": others,
    }


PARTS = ("total_s", "docker_to_process_s", "process_to_init_s", "init_s", "init_to_first_step_s",
         "container_start_to_init_s", "init_start_to_first_step_s", "run_s")


def spread(values: list[float | None]) -> dict[str, Any] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure_startup(image: str, source: Path, repeats: int, wait_idle: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-container-"))
    try:
        data_dir = prepare_data(source, work)
        runs = []
        for repeat in range(repeats):
            kind = "cold" if repeat == 0 else "warm"
            run = one_run(image, data_dir, work, repeat, kind, wait_idle)
            runs.append(run)
            init = f"{run['init_s']:.2f}" if run["init_s"] is not None else "?"
            print(f"repeat {repeat + 1}/{repeats} {kind}: first step {run['total_s']:.2f} s after docker run "
                  f"(engine {run['docker_to_process_s']:.2f}, to wandb.init {run['process_to_init_s']:.2f}, "
                  f"init {init}, to step {run['init_to_first_step_s']:.2f}); others CPU "
                  f"{run['others_cpu'] if run['others_cpu'] is None else format(run['others_cpu'], '.0%')}",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {kind: {part: spread([r[part] for r in runs if r["data"] == kind]) for part in PARTS}
               for kind in ("cold", "warm")}
    return {"settings": dict(RUN_ENV), "repeats": runs, "cold": summary["cold"],
            "warm": summary["warm"] if repeats > 1 else None}


# --- report -------------------------------------------------------------------------------------


def verdicts(size: dict | None, startup: dict | None) -> dict[str, Any]:
    out = {}
    if size is not None:
        value = size["beyond_torch_bytes"] / MB
        out["beyond_torch_mb"] = {"target": TARGETS["beyond_torch_mb"], "measured": value,
                                  "met": value <= TARGETS["beyond_torch_mb"]}
    if startup is not None:
        warm = startup["warm"]["total_s"] if startup["warm"] else None
        value = warm["median"] if warm else None
        out["startup_warm_s"] = {"target": TARGETS["startup_warm_s"], "measured": value,
                                 "met": value <= TARGETS["startup_warm_s"] if value is not None else None}
    return out


def machine(engine: str) -> dict[str, Any]:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "kernel": platform.release(), "docker_engine": engine}


def mb(n: float | None) -> str:
    return "?" if n is None else f"{n / MB:,.0f} MB"


def fmt(s: dict | None) -> str:
    return "-" if s is None else f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"


def table(report: dict) -> str:
    lines = []
    size = report.get("size")
    if size:
        lines += [
            f"image {size['image']} ({size['image_id'][7:19]}): {mb(size['image_bytes'])} (docker image inspect .Size)",
            (f"  base {size['base']}: {mb(size['base_bytes'])}; our layers: {mb(size['our_layers_bytes'])}"
             if size["base"] else "  base: not given (--base)"),
            (f"  torch's own packages: {mb(size['torch_closure_bytes'])} in {len(size['torch_closure'])} distributions "
             f"({', '.join(size['torch_closure'])})"),
            (f"  beyond torch: {mb(size['beyond_torch_bytes'])} = "
             + (f"base {mb(size['base_bytes'])} + " if size["base"] else "")
             + f"other distributions {mb(size['other_dists_bytes'])} + the rest {mb(size['rest_bytes'])} "
             + ("(venv, /app, layer overlaps)" if size["base"] else "(the base, venv, /app, layer overlaps)")),
            "  largest distributions outside torch's:",
            *(f"    {d['name'] + '==' + d['version']:<32} {d['bytes'] / MB:7.1f} MB" for d in size["largest_other_dists"]),
        ]
        if size["torch_closure_missing"]:
            lines.append(f"  required but not installed (markers): {', '.join(size['torch_closure_missing'])}")
    startup = report.get("startup")
    if startup:
        lines += [
            "",
            (f"docker run -> first training step, seconds, median [min, max] "
             f"({', '.join(f'{k}={v}' for k, v in startup['settings'].items())})"),
            ("| data | runs | total | docker run -> process | process -> wandb.init | wandb.init "
             "| init -> first step | others CPU |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for kind in ("cold", "warm"):
            s = startup[kind]
            if not s:
                continue
            shares = [r["others_cpu"] for r in startup["repeats"] if r["data"] == kind and r["others_cpu"] is not None]
            share = f"{statistics.median(shares):.0%} [{min(shares):.0%}, {max(shares):.0%}]" if shares else "?"
            lines.append(f"| {kind} | {s['total_s']['n']} | {fmt(s['total_s'])} | {fmt(s['docker_to_process_s'])} | "
                         f"{fmt(s['process_to_init_s'])} | {fmt(s['init_s'])} | {fmt(s['init_to_first_step_s'])} | {share} |")
        shares = [r["others_cpu"] for r in startup["repeats"] if r["others_cpu"] is not None]
        if shares and max(shares) > NOISY:
            lines.append(f"note: other processes used up to {max(shares):.0%} of the CPUs just before a run: the machine "
                         "was shared and the numbers are noisy (--wait-idle waits for a quiet moment)")
    lines.append("")
    for name, v in report["targets"].items():
        unit = "MB" if name.endswith("_mb") else "s"
        if v["measured"] is None:
            lines.append(f"target {name} <= {v['target']:g} {unit}: not measured (needs --repeats 2 or more: repeat 1 is cold)")
        else:
            lines.append(f"target {name} <= {v['target']:g} {unit}: measured {v['measured']:.2f} {unit} -> "
                         f"{'met' if v['met'] else 'MISSED'}")
    return "\n".join(lines).lstrip("\n")


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--image", default=IMAGE, help=f"the image to measure (default: {IMAGE})")
    ap.add_argument("--base", default=BASE,
                    help=f"the image's FROM image, to split base from our layers; 'none' to skip (default: {BASE})")
    ap.add_argument("--repeats", type=int, default=5, help="container runs; the first is cold (default: 5)")
    ap.add_argument("--only", choices=("size", "startup"), help="measure only this (default: both)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each run, wait up to SECONDS for the machine to be quiet (default: 0)")
    ap.add_argument("--source", default=SOURCE, help=f"folder with the four Fashion-MNIST .gz files (default: {SOURCE})")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be 1 or more")
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    engine = check_engine()
    if args.only != "size":
        check_source(Path(args.source))  # before minutes of work, not after
    image_info = inspect_image(args.image, "--image", f"build it: scripts/build-image --tag {args.image}")
    base, base_info = (None, None) if args.base.lower() == "none" else (args.base, None)
    if base and args.only != "startup":
        base_info = inspect_image(base, "--base", "the image's FROM image, or --base none")
        layers, base_layers = image_info["RootFS"]["Layers"], base_info["RootFS"]["Layers"]
        if layers[:len(base_layers)] != base_layers:
            raise BenchError(f"--base {base} is not the base of {args.image} (its layers are not the image's first "
                             "layers): name the image's FROM image, or --base none")
    report: dict[str, Any] = {"machine": machine(engine)}
    if args.only != "startup":
        report["size"] = measure_size(args.image, image_info, base, base_info)
    if args.only != "size":
        report["startup"] = measure_startup(args.image, Path(args.source), args.repeats, args.wait_idle)
    report["targets"] = verdicts(report.get("size"), report.get("startup"))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = bench(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
