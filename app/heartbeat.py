"""A thread that beats while a run trains: `beat()` every `interval` seconds until `stop()`.

    class TrialHeartbeat(Heartbeat):
        def beat(self) -> bool: ...      # one beat; False: what it beats for is gone, the thread ends
    beat = TrialHeartbeat("heartbeat-7", interval=10.0)
    beat.start(); ...; beat.stop()

Both agents keep one beside the run they train: the offline agent's (app.sweep.optuna.claims) writes
the time into the trial in the sweep storage, the warm agent's (app.sweep.wandb.warm_agent) asks W&B's
server for commands as `wandb agent` does. The loop and its stop are this class; what a beat does and
how a failed one is handled stay with each agent, as they differ in substance (a storage outage is
said once and may mean another agent failed the trial; a lost W&B call is retried at the next beat).
"""

from __future__ import annotations

import threading


class Heartbeat(threading.Thread):
    first_now = True  # the first beat at start; False: after one interval
    join_s = 30.0  # stop() waits this long for a beat in progress (a slow storage or server call)

    def __init__(self, name: str, interval: float):
        super().__init__(daemon=True, name=name)  # daemon: a beat stuck in a call never holds the process
        self.interval = interval
        self._halt = threading.Event()

    def beat(self) -> bool:
        """One beat; False ends the thread (nothing left to beat for)."""
        raise NotImplementedError

    def run(self) -> None:
        wait = 0.0 if self.first_now else self.interval
        while not self._halt.wait(wait):
            if not self.beat():
                return
            wait = self.interval

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=self.join_s)
