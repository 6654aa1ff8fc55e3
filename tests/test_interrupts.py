"""A stop that arrives while a module is being imported (torch, numpy and W&B load lazily at start-up)
is taken once the import is done: raised inside it, an extension module's initialisation can swallow
it, leaving that module half-made and the process going on as if no stop had come. Likewise a stop that
arrives while a finalizer runs (a __del__, a weakref callback), where Python prints it and drops it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

# a module whose initialisation does what an extension's C init may do with an error it did not expect:
# it clears it and carries on
SWALLOWING_MODULE = """
import os, signal, time
try:
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(200):
        time.sleep(0.001)  # the signal is handled here, inside the import
    swallowed = False
except BaseException:
    swallowed = True
"""

PROGRAM = """
import sys, time
sys.path.insert(0, sys.argv[1])
from app import interrupts
interrupts.install()
try:
    import swallowing
    print("imported; swallowed a stop:", swallowing.swallowed, flush=True)
    time.sleep(5)
    print("went on after the stop", flush=True)
except interrupts.Stopped as stop:
    print(stop, flush=True)
    sys.exit(stop.exit_code)
"""


def test_a_stop_during_an_import_is_taken_once_the_import_is_done(tmp_path: Path):
    (tmp_path / "swallowing.py").write_text(SWALLOWING_MODULE)
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.splitlines() == ["imported; swallowed a stop: False", "stopped by SIGINT"], proc.stdout + proc.stderr
    assert proc.returncode == 130


FINALIZER_PROGRAM = """
import os, signal, sys, threading, time
from app import interrupts
interrupts.install()

class Finalized:
    def __del__(self):
        time.sleep(0.5)  # the signal is handled here, inside the finalizer

try:
    finalized = Finalized()
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
    del finalized
    print("finalized", flush=True)
    time.sleep(5)
    print("went on after the stop", flush=True)
except interrupts.Stopped as stop:
    print(stop, flush=True)
    sys.exit(stop.exit_code)
"""


def test_a_stop_during_a_finalizer_is_taken_once_it_is_done():
    proc = subprocess.run([sys.executable, "-c", FINALIZER_PROGRAM], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    # before: "Exception ignored in: <function Finalized.__del__ ...>", a traceback, and the process went on
    assert proc.stdout.splitlines() == ["finalized", "stopped by SIGTERM"], proc.stdout + proc.stderr
    assert proc.returncode == 143 and proc.stderr == "", proc.stderr
