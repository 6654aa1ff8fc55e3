"""bench/container.py on the image under test: it measures the image's size and two real `docker run`s
(one cold, one warm) and reports numbers that add up. No timing assertions: the numbers belong to the
machine, not the code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, error_lines
from containers import BASE_IMAGE, app_image, docker, ensure_base_image, ensure_docker  # noqa: F401  (session fixture)

pytestmark = pytest.mark.container

BENCH = REPO / "bench" / "container.py"
GB = 1e9


def run_bench(args: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def test_reports_size_beyond_torch_and_startup_parts_that_add_up(app_image, tmp_path: Path):
    out = tmp_path / "container.json"
    # two repeats: the cold one (unpacks the archives) and a warm one (reuses them), each a real training run
    proc = run_bench(["--image", app_image, "--base", ensure_base_image(), "--repeats", "2", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())

    size = report["size"]
    image = json.loads(docker("image", "inspect", app_image).stdout)[0]
    base = json.loads(docker("image", "inspect", BASE_IMAGE).stdout)[0]
    assert size["image_bytes"] == image["Size"] and size["base_bytes"] == base["Size"]
    assert size["torch_closure_bytes"] + size["beyond_torch_bytes"] == size["image_bytes"]
    assert size["base_bytes"] + size["other_dists_bytes"] + size["rest_bytes"] == size["beyond_torch_bytes"]
    # every distribution's files live in our layers, never in the base: the sums cannot exceed them
    assert 0 <= size["rest_bytes"] and size["torch_closure_bytes"] + size["other_dists_bytes"] <= size["our_layers_bytes"]
    names = {entry.split("==")[0].lower() for entry in size["torch_closure"]}
    assert {"torch", "torchvision", "numpy", "pillow", "sympy"} <= names  # torchvision's and torch's requirements
    # the test image carries PyPI's CUDA torch: the CUDA libraries that torch's extras pull in count as torch's
    assert {"nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cufft"} <= names, sorted(names)
    assert size["torch_closure_bytes"] > 1 * GB
    others = {d["name"].lower(): d["bytes"] for d in size["largest_other_dists"]}
    assert len(others) == 10 and {"wandb", "onnxruntime"} <= set(others) and not set(others) & names
    assert list(others.values()) == sorted(others.values(), reverse=True) and others["wandb"] > 10e6

    startup = report["startup"]
    runs = startup["repeats"]
    assert [r["data"] for r in runs] == ["cold", "warm"] and len({r["run_id"] for r in runs}) == 2
    for r in runs:
        assert 0 < r["total_s"] < 120, r
        assert r["docker_to_process_s"] > 0 and r["process_to_init_s"] > 0 and r["init_to_first_step_s"] > 0, r
        assert r["init_s"] is not None and r["init_s"] > 0, r  # wandb's debug.log line was found and placed
        parts = r["docker_to_process_s"] + r["process_to_init_s"] + r["init_s"] + r["init_to_first_step_s"]
        assert parts == pytest.approx(r["total_s"], abs=1e-6), r
        assert r["container_start_to_init_s"] + r["init_start_to_first_step_s"] == pytest.approx(r["total_s"], abs=1e-6)
        assert r["run_s"] > r["total_s"] and r["history_rows"] >= 2, r  # it trained on past the first step
    assert startup["cold"]["total_s"]["n"] == 1 and startup["warm"]["total_s"]["median"] == runs[1]["total_s"]

    targets = report["targets"]
    assert targets["beyond_torch_mb"]["measured"] == pytest.approx(size["beyond_torch_bytes"] / 1e6)
    assert targets["startup_warm_s"]["measured"] == runs[1]["total_s"]
    assert {k: type(v["met"]) for k, v in targets.items()} == {"beyond_torch_mb": bool, "startup_warm_s": bool}
    for text in ("beyond torch", "largest distributions outside torch's", "| cold | 1 |", "| warm | 1 |",
                 "target beyond_torch_mb <= 400 MB", "target startup_warm_s <= 5 s"):
        assert text in proc.stdout, text


def test_a_missing_image_is_one_error_line_and_exit_2():
    ensure_docker()
    proc = run_bench(["--image", "mnist-sweeps:no-such-tag", "--repeats", "1"], timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_lines(proc.stderr) == proc.stderr.strip().splitlines() and len(error_lines(proc.stderr)) == 1
    assert "--image mnist-sweeps:no-such-tag: no such image" in proc.stderr


def test_a_base_that_is_not_the_images_base_is_refused(app_image):
    # swapped on purpose: the app image's layers are not the first layers of the base
    proc = run_bench(["--image", ensure_base_image(), "--base", app_image, "--only", "size"], timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(error_lines(proc.stderr)) == 1 and "is not the base of" in proc.stderr


def test_no_docker_engine_is_one_error_line_and_exit_2(tmp_path: Path):
    ensure_docker()  # the client must be there to find the engine missing
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_CONTEXT"}
    env["DOCKER_HOST"] = f"unix://{tmp_path / 'no-engine.sock'}"  # nothing listens there
    proc = run_bench(["--repeats", "1"], env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(error_lines(proc.stderr)) == 1 and "the Docker engine does not answer" in proc.stderr
