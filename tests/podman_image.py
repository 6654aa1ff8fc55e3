"""An image of Docker's in podman's storage, for the test of the documented podman line under Slurm.

    python tests/podman_image.py mnist-sweeps:test      # .ci/run: loads it while the other tests run

The 6 GB load takes minutes, so it runs only when podman's copy has another image id than Docker's (a
rebuilt image, or none yet), and under a lock: the test waits for a load .ci/run started instead of
starting a second one. Layers podman already holds (torch's) are not stored again.
"""

from __future__ import annotations

import subprocess
import sys
import time

from containers import exclusive  # tests/ is on sys.path, under pytest and as a script


def podman(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)


def load(image: str) -> float:
    """`image` in podman's storage with Docker's image id; returns the seconds this call waited and loaded."""
    t0 = time.monotonic()
    with exclusive("podman-load"):
        want = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True,
                              text=True, timeout=60).stdout.strip().removeprefix("sha256:")
        assert want, f"{image} is not in Docker"
        old = podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
        if old != want:
            save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
            loaded = subprocess.run(["podman", "load"], stdin=save.stdout, capture_output=True, text=True, timeout=1200)
            save.stdout.close()
            assert save.wait(timeout=60) == 0 and loaded.returncode == 0, loaded.stderr[-2000:]
            assert podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip() == want
            if old:  # the copy of the image this one replaced: untagged now, nothing else uses it
                podman("rmi", old)
    return time.monotonic() - t0


if __name__ == "__main__":
    print(f"podman has {sys.argv[1]} ({load(sys.argv[1]):.0f} s)")
