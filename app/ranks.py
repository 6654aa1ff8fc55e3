"""A trial on several GPUs: its ranks, their process group, what they reduce and what they agree on.

    team = ranks.start(config, environ, device_type, payload)   # rank 0, after wandb.init
    ...train with team.sum(...), team.agree_stop(...), team.decide(...)...
    team.end(ok)                                                # joins (or ends) the other ranks

GPUS_PER_TRIAL=N (default 1) trains one trial as N ranks under torch.distributed: NCCL on CUDA, gloo on
the CPU. Under `torchrun --nproc-per-node=N -m app train` (RANK/WORLD_SIZE/LOCAL_RANK given) the ranks
join as torchrun started them; otherwise the process that owns the trial (a single run, the process
`wandb agent` starts, the warm agent's, the offline agent's) is rank 0 and starts ranks 1..N-1 itself with
torch.multiprocessing (start_processes, "spawn"). Not torch.distributed.elastic: its agent makes the
caller a supervisor of N workers, whereas here rank 0 must stay the caller, the process that holds the W&B
run, the Optuna trial and its heartbeat, and a warm agent's state. Rank 0 hands the others the resolved
Config (the sweep's values, however they arrived) with the run's id: they never read W&B, never import it.

Every collective is bounded by RANK_TIMEOUT_S (default 120 s; the ranks' meeting by MEET_S if that is
longer): a rank that dies closes its connections, and the others' next collective fails at once; one that
hangs (or is frozen, SIGSTOP) makes them fail after RANK_TIMEOUT_S. Rank 0 then names the rank and the
trial fails (`RankLost`); the agent goes on. The bound is for the ranks' shared work only. Where the others
wait for rank 0's own work they wait as long as it takes: after each epoch, while rank 0 logs to W&B,
writes the checkpoint and reports to the sweep (whose storage may be a slow PostgreSQL), on the ranks'
store (`decide`); under torchrun, for rank 0's wandb.init before they meet; after the test-set pass, their
last collective, they end while rank 0 exports and uploads the model, and rank 0 waits for their exit.

The stop agreement: each rank's stop request (SIGTERM/SIGINT, to any or all of them) goes into one
all-reduce of a single integer (max) every training step, so every rank stops after the same step. Its
cost is one tiny collective per step and, on CUDA, one device-to-host read of it: a few tens of
microseconds per step, paid with N > 1 only (one rank agrees with nobody).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Mapping

from app import settings
from app.errors import UserError

TIMEOUT_S = settings.TABLE["RANK_TIMEOUT_S"].default  # RANK_TIMEOUT_S unset
MEET_S = 120.0  # the ranks' meeting, at least: a started rank imports torch (on CUDA, opens its GPU) first
LEAD_WAIT = timedelta(days=7)  # the others' wait for rank 0's own work (W&B, disk, the sweep's storage): no bound
JOIN_S = 30  # how long rank 0 waits for the others to end once the trial is over
HOST = "127.0.0.1"  # the ranks rank 0 starts are on its host


class RankLost(Exception):
    """Another rank died or went silent: the trial fails (one line naming the rank)."""


def torchrun(environ: Mapping[str, str]) -> bool:
    """Started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return settings.is_set("RANK", environ) and settings.is_set("WORLD_SIZE", environ)


def timeout_s(environ: Mapping[str, str]) -> float:
    """RANK_TIMEOUT_S: how long a collective (and the ranks' meeting) may wait for a silent rank."""
    return settings.get("RANK_TIMEOUT_S", environ)


def size(environ: Mapping[str, str]) -> int:
    """How many ranks train a trial: torchrun's WORLD_SIZE, else GPUS_PER_TRIAL."""
    if torchrun(environ):
        return settings.get("WORLD_SIZE", environ)
    return settings.get("GPUS_PER_TRIAL", environ)


def is_follower(environ: Mapping[str, str]) -> bool:
    """A rank other than 0 that torchrun started: it takes its config from rank 0, not from W&B."""
    return torchrun(environ) and settings.get("RANK", environ) > 0


def check(config, n: int, device_type: str = "cpu", environ: Mapping[str, str] | None = None) -> None:
    """The config can be split over `n` ranks, and on CUDA this process sees a GPU for each rank it
    starts (torchrun's ranks may span hosts: torchrun placed them): one line naming the settings otherwise."""
    if n > 1:
        timeout_s(environ or {})  # a bad bound fails before any run opens
    if n > 1 and config.batch_size % n:
        raise UserError(f"batch_size={config.batch_size} must be a multiple of GPUS_PER_TRIAL={n}: "
                        "the global batch is split evenly over the ranks")
    if n > 1 and device_type == "cuda" and not torchrun(environ or {}):
        import torch

        visible = torch.cuda.device_count()
        if visible < n:
            raise UserError(f"GPUS_PER_TRIAL={n} but this trial sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES): "
                            f"give it {n} GPUs or lower GPUS_PER_TRIAL")


@dataclass
class Team:
    """This process's place among a trial's ranks. `Team()` is one rank alone: every call is free."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    processes: list = field(default_factory=list)  # rank 0: the ranks it started (index i: rank i + 1)
    timeout_s: float = TIMEOUT_S  # RANK_TIMEOUT_S: every collective's bound
    decisions: int = 0  # rank 0's decisions told so far (each one's key in the ranks' store)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def device(self, device):
        """This rank's device: GPU `local_rank` on CUDA."""
        import torch

        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.size > 1 else device

    def _collective(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # gloo's closed connection, NCCL's or gloo's timeout
            raise RankLost(self.who_failed(exc)) from exc

    def sum(self, tensor):
        """`tensor` summed over the ranks, in place (one rank: itself)."""
        if self.size > 1:
            import torch.distributed as dist

            self._collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
        return tensor

    def agree_stop(self, signum: int | None, device) -> int | None:
        """The stop signal any rank was sent (the same answer on every rank), None: go on."""
        if self.size == 1:
            return signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([signum or 0], device=device)
        self._collective(lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX))
        return int(flag.item()) or None

    def decide(self, yes: bool) -> bool:
        """Rank 0's decision (an early stop after an epoch), told to every rank. Not a collective: rank 0
        decides after its own work of the epoch (W&B, the checkpoint, the sweep's storage), which the others
        wait for through the ranks' store, as long as it takes (LEAD_WAIT), not RANK_TIMEOUT_S; rank 0 waits
        for nobody here. A rank 0 that dies closes the store's connection: the wait fails at once."""
        if self.size == 1:
            return yes
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()  # the one the ranks met on (rank 0's, or torchrun's)
        key = f"app/decision/{self.decisions}"
        self.decisions += 1
        if self.lead:
            self._collective(lambda: store.set(key, "1" if yes else "0"))
            return yes
        self._collective(lambda: store.wait([key], LEAD_WAIT))
        return self._collective(lambda: store.get(key)) == b"1"

    def lost(self, exc: BaseException) -> RankLost | None:
        """`exc` as the lost rank it means (a collective inside DDP's backward fails as a bare RuntimeError
        of gloo or NCCL), None when it is no such failure."""
        if isinstance(exc, RankLost):
            return exc
        if self.size == 1 or not isinstance(exc, RuntimeError):
            return None
        import torch.distributed as dist

        text = str(exc)
        if isinstance(exc, getattr(dist, "DistError", ())) or any(w in text for w in ("gloo", "NCCL", "Connection")):
            return RankLost(self.who_failed(exc))
        return None

    def who_failed(self, exc: BaseException | None = None) -> str:
        """One line naming the rank that died or went silent."""
        what = str(exc).strip().splitlines()[0][:160] if exc is not None else "no answer"
        silent = "timed out" in what.lower() or "timeout" in what.lower()  # a hung rank, not a closed connection
        if self.processes:
            # a killed rank is reaped a moment after its sockets close; a silent one is not dying: no wait
            deadline = time.monotonic() + (0 if silent else 5)
            while True:
                ended = [(i + 1, p.exitcode) for i, p in enumerate(self.processes) if p.exitcode is not None]
                if ended:
                    rank, code = ended[0]
                    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"ended with exit code {code}"
                    return f"rank {rank} of {self.size} {how}; the trial fails"
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        if self.lead and self.processes:
            others = "rank 1" if self.size == 2 else f"one of ranks 1-{self.size - 1}"
            if silent:  # gloo's and NCCL's words name no rank: ours do
                return f"{others} of {self.size} silent for RANK_TIMEOUT_S={self.timeout_s:g} s; the trial fails"
            return f"{others} of {self.size} silent for up to {self.timeout_s:g} s ({what}); the trial fails"
        return f"rank {self.rank} of {self.size} lost another rank ({what}); the trial fails"

    def end(self, ok: bool) -> None:
        """Leave the process group; rank 0 waits for the ranks it started (ends them when the trial failed)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        if not ok:
            for p in self.processes:  # they would wait RANK_TIMEOUT_S on a collective rank 0 no longer makes
                if p.exitcode is None:
                    p.kill()  # SIGKILL: it ends a frozen (SIGSTOPped) rank too
        deadline = time.monotonic() + JOIN_S
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join()
        self.processes = []
        if dist.is_initialized():
            dist.destroy_process_group()


def backend(device_type: str) -> str:
    """NCCL for a trial on GPUs; under torchrun (where a rank learns the device only from rank 0) both,
    each for its own tensors."""
    return "nccl" if device_type == "cuda" else "cuda:nccl,cpu:gloo" if device_type == "any" else "gloo"


def _join(rank: int, world: int, device_type: str, local_rank: int, meet: float, timeout: float, store=None) -> None:
    """Meet the other ranks within `meet` seconds; every collective after that within `timeout`."""
    import torch
    import torch.distributed as dist

    if device_type in ("cuda", "any") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # NCCL binds each rank to its own GPU
    kwargs = {"store": store, "rank": rank, "world_size": world} if store is not None else {}
    dist.init_process_group(backend(device_type), timeout=timedelta(seconds=meet), **kwargs)
    dist.set_timeout(timedelta(seconds=timeout))


def start(n: int, environ: Mapping[str, str], device_type: str, payload: dict[str, Any],
          follower: Callable[..., None]) -> Team:
    """Rank 0's side: the team of `n` ranks met, the others given `payload` (the resolved Config, the run's
    id, the outputs folder). Under torchrun they are there already and get it by broadcast; otherwise they
    are started here, each running `follower(index, payload, store_port, n)` (rank index + 1), and take
    RANK_TIMEOUT_S from the payload."""
    if n == 1:
        return Team()
    import torch.distributed as dist

    timeout = timeout_s(environ)
    if torchrun(environ):
        local = settings.get("LOCAL_RANK", environ) or 0
        _join(0, n, "any" if _cuda() else "cpu", local, max(timeout, MEET_S), timeout)
        team = Team(0, n, local, timeout_s=timeout)
        team._collective(lambda: dist.broadcast_object_list([payload], src=0))
        return team
    import torch.multiprocessing as mp

    store = dist.TCPStore(HOST, 0, n, is_master=True, timeout=timedelta(seconds=max(timeout, MEET_S)),
                          wait_for_workers=False)  # port 0: a free one; the ranks meet in init_process_group
    payload = {**payload, "rank_timeout_s": timeout}
    context = mp.start_processes(follower, args=(payload, store.port, n), nprocs=n - 1, join=False, start_method="spawn")
    team = Team(0, n, 0, list(context.processes), timeout)
    try:
        team._collective(lambda: _join(0, n, device_type, 0, max(timeout, MEET_S), timeout, store))
    except BaseException:
        team.end(False)
        raise
    return team


def join_started(index: int, store_port: int, n: int, device_type: str, timeout: float = TIMEOUT_S) -> Team:
    """A rank that rank 0 started: rank index + 1, GPU index + 1."""
    import torch.distributed as dist

    rank = index + 1
    store = dist.TCPStore(HOST, store_port, n, is_master=False, timeout=timedelta(seconds=max(timeout, MEET_S)))
    _join(rank, n, device_type, rank, max(timeout, MEET_S), timeout, store)
    return Team(rank, n, rank, timeout_s=timeout)


def join_torchrun(environ: Mapping[str, str]) -> tuple[Team, dict[str, Any]]:
    """A follower torchrun started: joins, then takes rank 0's payload."""
    import torch.distributed as dist

    rank, n = settings.get("RANK", environ), settings.get("WORLD_SIZE", environ)
    local, timeout = settings.get("LOCAL_RANK", environ) or 0, timeout_s(environ)
    # torchrun starts every rank at once, but rank 0 joins only after its wandb.init (however long W&B takes):
    # the others' meeting waits for it without RANK_TIMEOUT_S, their collectives from then on within it
    _join(rank, n, "any" if _cuda() else "cpu", local, LEAD_WAIT.total_seconds(), timeout)
    team = Team(rank, n, local, timeout_s=timeout)
    box: list[Any] = [None]
    team._collective(lambda: dist.broadcast_object_list(box, src=0))
    return team, box[0]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def quiet_signals(note: Callable[[int], None]) -> None:
    """A rank other than 0 before its training loop: a stop is noted (and agreed at the first step) rather
    than ending it before it met the others, which would leave them waiting for it."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: note(signum))


class QuietRun:
    """What a rank other than 0 has in place of the W&B run: its id (the run's folder), nothing recorded."""

    disabled = True

    def __init__(self, run_id: str):
        self.id = run_id
        self.summary: dict[str, Any] = {}

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def mark_preempting(self) -> None:
        pass


def devnull():
    return open(os.devnull, "w")  # a rank other than 0 shows no progress: rank 0 shows the trial's
