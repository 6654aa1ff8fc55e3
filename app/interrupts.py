"""SIGINT/SIGTERM outside the training loop: one line and exit 128+signum, never a traceback.

    interrupts.install()        # first thing in a command: a stop now raises `Stopped`
    with interrupts.deferred(): # around wandb.init / run.finish: a stop is raised when the block ends,
        run = wandb.init(...)   #   so W&B never stops half-way and every run gets its exit record
    interrupts.finished()       # after "done:": the work is saved, a stop now exits 0

The training loop replaces these handlers with its own while it runs (`StopRequest`: a flag it checks
between steps; checkpoint, then `Preempted`) and puts them back when it ends. Every handler notes the signal (`requested()`): an agent that sees one
takes no new trial, whichever handler caught it.

A job-wide stop (a plain `scancel`, a pod's or a container's whole process group) signals W&B's own
service process (`wandb-core`) too: it shuts down, and every later call into the run raises
`ConnectionResetError`. `wandb_lost(exc)` tells that apart from a failing run: it is a stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Iterator, Mapping

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"deferring": False, "pending": None, "requested": None, "raised": False}


class Stopped(BaseException):
    """A stop before training started or after it ended (BaseException: `except Exception` lets it by).

    `told`: W&B recorded the run as preempting (set by what recorded it; a stop before the run opened, or
    once W&B's service was gone, is not one W&B knows of)."""

    told = False

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def note(signum: int) -> None:
    """A stop signal arrived (the first one is kept)."""
    if _state["requested"] is None:
        _state["requested"] = signum


def requested() -> int | None:
    """The stop signal this process was sent, if any (since `clear()`)."""
    return _state["requested"]


def clear() -> None:
    _state["requested"] = None
    _state["raised"] = False


def wandb_lost(exc: BaseException) -> bool:
    """True when `exc` is W&B's service connection breaking: a ConnectionError raised inside wandb."""
    if not isinstance(exc, ConnectionError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}wandb{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class Recording:
    """What `unless_wandb_lost` saw: `lost` when W&B's service was gone, so nothing was recorded."""

    lost = False


@contextlib.contextmanager
def unless_wandb_lost() -> Iterator[Recording]:
    """Around W&B calls that only record a stop: with the service gone there is nothing to record to
    (and the caller must not claim it recorded anything: `as recording`, then `recording.lost`)."""
    recording = Recording()
    try:
        yield recording
    except Exception as exc:
        if not wandb_lost(exc):
            raise
        recording.lost = True


class StopRequest(contextlib.AbstractContextManager):
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps, so a stop never tears a checkpoint."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        note(signum)  # the sweep agent running this trial takes no new one

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


RETRY_S = 0.05  # how soon a stop that came during an import is taken again


def _importing(frame) -> bool:
    """Whether the interrupted code runs inside an import (its caller chain passes through importlib)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _raise(signum, frame) -> None:
    note(signum)
    if _state["raised"]:
        # the process is already ending on the first stop: a second one (a plain `scancel` signals every
        # process, and the supervisor forwards its own too) raised in the middle of that would be a traceback
        return
    if _state["deferring"]:
        _state["pending"] = signum
        return
    if _importing(frame):
        # raised inside an import (torch, numpy, W&B load lazily at start-up), the stop can be swallowed by
        # an extension module's initialisation, which leaves that module half-made and the process going
        # on as if no stop had come: it is sent again, and taken once the import is done
        _send_again(signum)
        return
    _state["raised"] = True
    raise Stopped(signum)


def _send_again(signum: int) -> None:
    timer = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _exit_zero(signum, frame) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the run is finished and recorded: a stop while W&B's service winds down is no failure


def _set(handler) -> None:
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        for sig in SIGNALS:
            signal.signal(sig, handler)


def quiet_wandb_lost() -> None:
    """W&B's own threads and exit handler print a lost service (ConnectionResetError) as a traceback: after
    a job-wide stop that is expected and said in one line by the run; other exceptions print as before.
    A stop raised inside a finalizer, which Python would print and drop, is taken again instead."""
    if getattr(threading.excepthook, "_quiet_wandb_lost", False):
        return
    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

    def in_thread(args) -> None:
        if args.exc_value is None or not wandb_lost(args.exc_value):
            thread_hook(args)

    def unraisable(args) -> None:
        if isinstance(args.exc_value, Stopped):
            # the stop came while a finalizer ran (a __del__, a weakref callback: GC runs them anywhere),
            # where Python prints the exception and drops it, and the process went on as if no stop had
            # come: it is sent again, and taken once the finalizer is done
            _state["raised"] = False
            _send_again(args.exc_value.signum)
        elif args.exc_value is None or not wandb_lost(args.exc_value):
            unraisable_hook(args)

    in_thread._quiet_wandb_lost = True  # type: ignore[attr-defined]
    threading.excepthook, sys.unraisablehook = in_thread, unraisable
    # asyncio's own line for writes to W&B's closed socket, logged by the service client's event loop
    logging.getLogger("asyncio").addFilter(lambda record: not record.getMessage().startswith("socket.send() raised"))


def install() -> None:
    quiet_wandb_lost()
    _set(_raise)


def finished() -> None:
    _set(_exit_zero)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop until the block ends. (Blocking the signals instead would be inherited by the
    processes W&B starts meanwhile: its service would never see a SIGTERM.)"""
    outer = _state["deferring"]
    _state["deferring"] = True
    try:
        yield
    finally:
        _state["deferring"] = outer
    if not outer and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        _state["raised"] = True
        raise Stopped(signum)


def run_forwarding(command: list[str], environ: Mapping[str, str], pass_fds: tuple[int, ...] = ()) -> tuple[int, int | None]:
    """Run `command` with SIGTERM/SIGINT passed on to it; returns its return code (negative: killed by
    that signal) and the first stop signal this process was sent meanwhile (None: none).

    The child gets its own process group (a terminal's Ctrl-C reaches it once, through us) and this
    process's inheritable descriptors (a GPU slot's lock stays held while it lives) plus `pass_fds`.
    """
    received: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        note(signum)
        if child:
            child[0].send_signal(signum)

    for sig in SIGNALS:
        signal.signal(sig, forward)
    for fd in pass_fds:  # (Popen's own pass_fds would close every other descriptor, the slot's lock too)
        os.set_inheritable(fd, True)
    child.append(subprocess.Popen(command, env=dict(environ), close_fds=False, process_group=0))
    for signum in received:  # a stop that came while the child was being started
        child[0].send_signal(signum)
    code = child[0].wait()
    return code, (received[0] if received else None)
