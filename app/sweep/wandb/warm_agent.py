"""A W&B sweep agent that trains every run the sweep hands it in one warm process (AGENT_PROCESS=warm).

    docker run -e SWEEP_ID=entity/project/id -e AGENT_PROCESS=warm IMAGE    (the entrypoint's agent mode)

`wandb agent` starts each run as a new `python -m app train` process, which pays the imports, W&B's
service, reading the data and (on a GPU) the CUDA context again for every run. Here W&B's server still
hands out the runs, through the same calls `wandb agent` makes (CreateAgent, then agentHeartbeat until it
says exit), and each run goes through the same `runner.prepare` + `dedupe.run_once` as `python -m app train`: the
sweep's values as --key=value arguments and in W&B's sweep parameter file, WANDB_RUN_ID and
WANDB_SWEEP_ID set, the duplicate guard, one complete W&B run.

Not W&B's own Python `wandb.agent(function=...)`: it calls the function in a thread, where no signal
handler can be installed (a stop could not checkpoint the run), and it restarts W&B's service for
every run. W&B keeps a run's sweep id, id and parameter file in its process-wide settings; they are
set for each run with `wandb.setup(settings)` instead.

What stays as with a process per run: a stop (SIGTERM/SIGINT, `docker stop`) checkpoints the running
run, marks it preempting and the agent exits 128+signal; a run that raises is recorded as failed and
the next starts clean (MAX_ERRORS_IN_A_ROW failures in a row stop the agent, exit 1); nothing of a run
outlives it but the data, kept once on the device (app.data).

A process that can no longer be trusted is replaced, as `wandb agent` replaces a run's process
(app.sweep.wandb.supervisor).

A sweep with early_terminate (hyperband): W&B's server asks to stop a run with a `stop` command in its
heartbeat answer, where `wandb agent` would SIGTERM the run's process. Here the heartbeat thread notes
it and the run ends at its next epoch boundary as an offline sweep's pruned trial ends (train()'s
on_epoch hook): summary pruned=True, no test or export, finished with exit code 0 and not marked
preempting (a preempting run would be handed out again and resumed, undoing the stop).

W&B's server going away (app.sweep.wandb.server): once it has not answered for AGENT_OUTAGE_S (60 s), the
agent stops as after a stop signal (it sends itself SIGTERM: a running run checkpoints within its
batch and is marked preempting, so its retry resumes), says so in one line naming WANDB_BASE_URL, and
exits 1 (within server.EXIT_S of that line, whatever W&B's own exit handlers still wait for on the
server), as the offline agent does when its database stops answering. The supervisor starts no fresh
process for it: the next one would wait on the same server.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Mapping

from app import interrupts, runner, settings, tracking
from app.heartbeat import Heartbeat
from app.sweep.wandb import best, dedupe, orphans
from app.sweep.wandb import server
from app.sweep.wandb.server import FINISH_S, Outage, Server, end_after, give_up, outage_line
from app.errors import UserError

PROCESSES = settings.setting("AGENT_PROCESS").choices
MAX_ERRORS_IN_A_ROW = 3  # as the offline agent: an agent whose runs keep failing stops
POLL_S = 5.0  # between heartbeats while the server has nothing to hand out (`wandb agent` polls as often)
UNTRUSTED = 70  # the warm process ends itself: a CUDA error left it unusable (EX_SOFTWARE); it is replaced


def say(msg: str) -> None:
    print(f"[warm-agent] {msg}", flush=True)


def sweep_parts(sweep: str) -> tuple[str | None, str | None, str]:
    parts = sweep.split("/")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else (None, None, parts[-1])


class ServerHeartbeat(Heartbeat):
    """Tells the server the run is still going while it trains (as `wandb agent` does between polls)."""

    first_now = False  # the server heard from the agent when it handed out the run

    def __init__(self, server: Server, agent_id: str, run_id: str):
        super().__init__("sweep-heartbeat", POLL_S)
        self.server, self.agent_id, self.run_id = server, agent_id, run_id
        self.join_s = server.outage_s  # a beat's call gives up once the server has not answered for that long
        self.exit_asked = False
        self.stop_asked = threading.Event()  # early_terminate: the run ends after its current epoch
        self.outage: Outage | None = None

    def beat(self) -> bool:
        try:
            commands = self.server.heartbeat(self.agent_id, {self.run_id: True})  # retried up to AGENT_OUTAGE_S
        except Outage as outage:
            # the run stops as a stop signal stops it (checkpoint, preempting); run() then says why, once.
            # (Not once the run is over: the agent's own next heartbeat then meets the outage.)
            self.outage = outage
            if not self._halt.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                # the checkpoint is written before any W&B call; an online run's finish, which would wait
                # on the gone server for minutes, is given FINISH_S
                end_after(FINISH_S, outage_line(outage, self.run_id, cut_short=True))
            return False
        except Exception as exc:  # a lost heartbeat is retried at the next one, as `wandb agent` does
            say(f"heartbeat failed ({type(exc).__name__}); retrying")
            return True
        for command in commands:
            if command.get("type") == "exit":
                self.exit_asked = True
            elif command.get("type") == "stop" and command.get("run_id") == self.run_id and not self.stop_asked.is_set():
                say(f"the server asked to stop run {self.run_id} (early_terminate): it ends after this epoch")
                self.stop_asked.set()
        return True


class WarmAgent:
    def __init__(self, sweep: str, environ: Mapping[str, str], count: int | None,
                 report: Callable[[str], None] = lambda line: None, failed_in_a_row: int = 0):
        self.entity, self.project, self.sweep_id = sweep_parts(sweep)
        self.environ = dict(environ)  # what each run sees: the runs' WANDB_MODE (AGENT_RUN_MODE) included
        self.count = count
        self.failed_in_a_row = failed_in_a_row  # the supervisor's count, carried over from the process before
        self.report = report  # "start RUN_ID" and "end CODE" for each run, to the supervising process
        self.exit_asked = False
        self.cuda_broken = False
        self.outage: Outage | None = None  # the server stopped answering during a run
        self.ran: list[str] = []  # the runs this process trained, for its closing line

    def connect(self):
        """W&B's own settings, the API and the agent's registration."""
        # as `wandb agent ENTITY/PROJECT/SWEEP` sets them for its runs; W&B reads them in this process.
        # The agent itself always talks to the server: the runs' mode is passed to each run's wandb.init
        for key, value in self.environ.items():
            if key != "WANDB_MODE":
                os.environ[key] = value
        os.environ.pop("WANDB_MODE", None)
        os.environ["WANDB_SWEEP_ID"] = self.sweep_id
        if self.entity:
            os.environ["WANDB_ENTITY"] = self.entity
        if self.project:
            os.environ["WANDB_PROJECT"] = self.project
        self.environ.update({k: v for k in ("WANDB_SWEEP_ID", "WANDB_ENTITY", "WANDB_PROJECT")
                             if (v := settings.raw(k)) is not None})
        # what each run's wandb.init would otherwise change in os.environ, set before W&B reads it here
        tracking.prepare_wandb_environ(self.environ)

        self.server = server.connect(self.environ)
        self.agent_id = self.server.register(socket.gethostname(), sweep_id=self.sweep_id, project=self.project,
                                             entity=self.entity)

    def run(self) -> int:
        try:
            return self.serve()
        except Outage as outage:  # between runs: nothing to checkpoint
            if self.ran:  # (an agent that never got to train has no best to tell)
                self.say_best(outage)
            return give_up(outage_line(outage))

    def serve(self) -> int:
        self.connect()
        say(f"serving sweep {self.sweep_id}: every run in this process (pid {os.getpid()}, agent {self.agent_id})")
        done, errors_in_a_row = 0, self.failed_in_a_row
        code = self.resume_orphans()  # runs a job-wide stop took from W&B first: W&B will not hand them out
        if code:
            return code
        while (self.count is None or done < self.count) and not self.exit_asked:
            commands = self.server.heartbeat(self.agent_id, {})
            if not commands:
                time.sleep(POLL_S)
                continue
            command = commands[0]
            kind = command.get("type")
            if kind == "exit":
                code = self.resume_orphans()  # one may have been stopped since this agent started
                if code:
                    return code
                say("the sweep has no more runs for this agent; exiting")
                self.say_best()
                return 0
            if kind not in ("run", "resume"):
                continue  # `stop` of a run this agent is not running
            self.report(f"start {command['run_id']}")
            code = self.run_one(command)
            self.report(f"end {code}")
            say(f"run {command['run_id']} ended with exit code {code}")
            done += 1
            if self.outage is not None:
                self.say_best(self.outage)
                return give_up(outage_line(self.outage, command["run_id"], code))
            if code == 0:
                errors_in_a_row = 0
            elif code >= 128:
                return code  # stopped: the run is checkpointed and marked preempting
            elif code == 1 and self.cuda_broken:
                say("a CUDA error other than out-of-memory: this process cannot be trusted; it ends here")
                return UNTRUSTED
            else:
                errors_in_a_row += 1
                if errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
                    say(f"{errors_in_a_row} runs in a row failed; stopping this agent")
                    self.say_best()
                    return 1
        say("the sweep asked this agent to exit" if self.exit_asked else f"ran {done} run(s) (AGENT_COUNT); agent exits")
        self.say_best()
        return 0

    def say_best(self, outage: Outage | None = None) -> None:
        """The sweep's best run so far, in one line, as the agent ends (app.sweep.wandb.best); after an
        outage from this agent's own runs, without asking the server again."""
        sweep = "/".join(p for p in (self.entity, self.project, self.sweep_id) if p)
        try:
            own = best.own_runs(self.environ, self.sweep_id, ids=self.ran)
            say(best.no_server_line(sweep, own, "it stopped answering") if outage is not None else
                best.closing_line(getattr(self, "server", None), sweep, own, self.environ))
        except Exception as exc:  # a last look: the runs are recorded whatever it finds
            say(f"no best-so-far line ({server.first_line(exc)})")

    def resume_orphans(self) -> int:
        """Resume, in this process, each run of the sweep a job-wide stop took from W&B (app.sweep.wandb.orphans)."""
        def resume(doc: dict[str, Any]) -> int:
            command = {"type": "resume", "run_id": doc["run_id"], "args": orphans.sweep_args(doc)}
            self.report(f"start {doc['run_id']}")
            code = self.run_one(command)
            self.report(f"end {code}")
            say(f"run {doc['run_id']} ended with exit code {code}")
            return code

        return orphans.resume_all(self.environ, self.sweep_id, resume)

    def run_one(self, command: dict[str, Any]) -> int:
        """One run as `python -m app train` runs it; its exit code as that process's would be."""
        import wandb
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
        from wandb.sdk.lib import config_util

        run_id = command["run_id"]
        self.ran.append(run_id)
        # where `wandb agent` writes a run's parameters; wandb.init reads them into run.config
        params = settings.runs_root(self.environ) / "wandb" / f"sweep-{self.sweep_id}" / f"config-{run_id}.yaml"
        config_util.save_config_file_from_dict(str(params), command["args"])
        args = create_sweep_command_args(command)["args"]
        environ = {**self.environ, "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(params)}
        say(f"run {run_id}: {' '.join(args)}")
        self.cuda_broken = False
        beat = ServerHeartbeat(self.server, self.agent_id, run_id)
        beat.start()
        try:
            # this run's id, sweep and parameter file in W&B's process-wide settings (read by wandb.init)
            wandb.setup(wandb.Settings(run_id=run_id, sweep_id=self.sweep_id, sweep_param_path=str(params)))
            return dedupe.run_once(list(args), environ, lambda: runner.prepare(list(args), environ, dotenv_path=None),
                                   last=False, on_epoch=lambda epoch, metrics: beat.stop_asked.is_set())
        except interrupts.Stopped as stop:
            print(runner.stopped_line(stop), file=sys.stderr, flush=True)
            return stop.exit_code
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        except Exception as exc:  # the run is recorded as failed (train() finishes it with exit code 1)
            traceback.print_exc()
            self.cuda_broken = _cuda_broken(exc)
            return 1
        finally:
            beat.stop()
            interrupts.install()  # between runs a stop is one line and 128+signal
            from app.train import release_device_memory

            held = release_device_memory()
            if held:
                say(held)
            self.exit_asked = beat.exit_asked  # the server said exit while the run trained: none after it
            self.outage = beat.outage


def _cuda_broken(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False  # that run asked for too much; the next one starts with the memory freed
    return isinstance(exc, torch.AcceleratorError) or "CUDA error" in str(exc)


def process_kind(environ: Mapping[str, str]) -> str:
    return settings.get("AGENT_PROCESS", environ)


def main(argv: list[str] | None = None) -> int:
    """The warm process itself, started by `supervise()` with the environment its runs see (bench/trials.py
    starts it alone, without --report-fd)."""
    parser = argparse.ArgumentParser(prog="python -m app.sweep.wandb.warm_agent")
    parser.add_argument("--sweep", required=True)
    parser.add_argument("--report-fd", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--failed-in-a-row", type=int, default=0)
    args = parser.parse_args(argv)
    report = lambda line: None  # noqa: E731
    if args.report_fd is not None:
        os.set_inheritable(args.report_fd, False)  # W&B's service and other helpers must not hold the pipe open
        report_to = os.fdopen(args.report_fd, "w", encoding="utf-8", buffering=1)
        report = lambda line: report_to.write(line + "\n")  # noqa: E731
    return runner.handle(WarmAgent(args.sweep, os.environ, args.count, report, args.failed_in_a_row).run)


if __name__ == "__main__":
    interrupts.install()
    code = main()
    runner.exit_after_run(code)  # the runs are finished and flushed; skip the interpreter's module teardown
