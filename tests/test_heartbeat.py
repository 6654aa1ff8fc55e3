"""The beating thread both agents keep beside a run (app.heartbeat): when it beats, and that it stops."""

from __future__ import annotations

import time

from app.heartbeat import Heartbeat


class Counting(Heartbeat):
    def __init__(self, interval: float, first_now: bool, beats: int | None = None):
        super().__init__("test-heartbeat", interval)
        self.first_now, self.beats, self.times = first_now, beats, []

    def beat(self) -> bool:
        self.times.append(time.monotonic())
        return self.beats is None or len(self.times) < self.beats


def _wait_for(condition, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)


def test_it_beats_at_once_then_every_interval_until_stopped():
    beat = Counting(0.05, first_now=True)
    start = time.monotonic()
    beat.start()
    _wait_for(lambda: len(beat.times) >= 3)
    beat.stop()
    assert not beat.is_alive() and beat.daemon
    assert beat.times[0] - start < 5.0 and all(b - a >= 0.045 for a, b in zip(beat.times, beat.times[1:]))
    done = len(beat.times)
    time.sleep(0.2)
    assert len(beat.times) == done  # nothing after stop()


def test_a_first_beat_after_one_interval_never_comes_when_stopped_before():
    beat = Counting(30.0, first_now=False)
    beat.start()
    started = time.monotonic()
    beat.stop()
    assert not beat.is_alive() and time.monotonic() - started < 5.0  # the wait is cut short, not sat out
    assert beat.times == []


def test_a_beat_that_says_false_ends_the_thread():
    beat = Counting(0.01, first_now=True, beats=2)
    beat.start()
    beat.join(timeout=10)
    assert not beat.is_alive() and len(beat.times) == 2
