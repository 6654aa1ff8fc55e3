"""A real single-node Slurm (Debian's slurmctld, slurmd, munge) and a real PostgreSQL, started by the tests.

    with slurm_cluster(root) as cluster:      # GRES gpu:2 on two character devices, shard:8 over them
        cluster.run(["sbatch", ...])           # SLURM_CONF points at this cluster's slurm.conf

Nothing starts by itself on these machines (no systemd): the daemons run in the foreground as our
children and are stopped by PID. Needs root (slurmd starts jobs as their user) and
`apt-get install slurmd slurmctld slurm-client munge`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")

SLURM_CONF = """ClusterName=tests
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again once its old credential expired: 20 s instead of the default 120
AuthInfo=socket={root}/munge/munge.socket,cred_expire=20
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu,shard
# the node's CPUs as written here, not as counted (a GPU node's 8 cores on a 2-core test machine)
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MinJobAge=600
NodeName=node1 NodeAddr=127.0.0.1 NodeHostname={host} CPUs=8 Gres=gpu:2,shard:8 State=UNKNOWN
PartitionName=main Nodes=node1 Default=YES MaxTime=INFINITE State=UP
"""

GRES_CONF = """NodeName=node1 Name=gpu File={root}/dev/gpu0
NodeName=node1 Name=gpu File={root}/dev/gpu1
NodeName=node1 Name=shard Count=8
"""


def unavailable(reason: str) -> None:
    """Skip outside CI (with the reason) when a part is missing; in CI the test must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI must run the cluster tests)")
    pytest.skip(reason)


def require(names: tuple[str, ...], why: str) -> None:
    missing = [n for n in names if not shutil.which(n)]
    if missing:
        unavailable(f"{', '.join(missing)} not found: {why}")
    if os.geteuid():
        unavailable("a Slurm node needs root (slurmd starts jobs as their user)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, env={**os.environ, **self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, timeout=kw.pop("timeout", 30), check=False, **kw)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


@contextlib.contextmanager
def slurm_cluster() -> Iterator[Cluster]:
    require(DAEMONS, "apt-get install slurmd slurmctld slurm-client munge")
    root = Path(tempfile.mkdtemp(prefix="slurm-"))  # not under pytest's 0700 tmp: munge must reach its socket
    root.chmod(0o755)
    (root / "munge").mkdir()
    shutil.chown(root / "munge", "munge", "munge")
    for sub in ("state", "spool", "dev"):
        (root / sub).mkdir()
    for i in (0, 1):  # GPUs without GPUs: Slurm takes any character device as a GRES file
        os.mknod(root / "dev" / f"gpu{i}", 0o666 | 0o020000, os.makedev(1, 3))
    host = socket.gethostname()
    (root / "slurm.conf").write_text(SLURM_CONF.format(host=host, root=root, ctld_port=free_port(), d_port=free_port()))
    (root / "gres.conf").write_text(GRES_CONF.format(root=root))
    env = {"SLURM_CONF": str(root / "slurm.conf")}
    daemons: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> None:
        with open(root / log, "a") as out:
            daemons.append(subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT))

    cluster = Cluster(root, env)
    try:
        start(["runuser", "-u", "munge", "--", "munged", "--foreground", f"--socket={root}/munge/munge.socket",
               f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/seed",
               f"--log-file={root}/munge/munged.log"], "munged.out.log")
        deadline = time.monotonic() + 20
        while not (root / "munge" / "munge.socket").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        start(["slurmctld", "-D", "-i"], "slurmctld.out.log")
        start(["slurmd", "-D", "-N", "node1"], "slurmd.out.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = cluster.run(["sinfo", "-h", "-n", "node1", "-o", "%T"]).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"Slurm node never became idle ({state!r})\n{cluster.logs()}")
        yield cluster
    finally:
        for proc in reversed(daemons):  # slurmd, slurmctld, munged: ours, by PID
            proc.terminate()
        for proc in reversed(daemons):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Postgres:
    """A running test server: `url`, and stop()/start() to take it away and bring it back on the same port."""

    root: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://sweep@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.root / "db"), *args],
                       check=check, capture_output=True)

    def start(self) -> None:
        self._ctl("-l", str(self.root / "log"), "-w", "start", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off")

    def stop(self, check: bool = True) -> None:
        """As a crashed or switched-off server: connections are reset, new ones refused at once."""
        self._ctl("-m", "immediate", "stop", check=check)


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL 15 on loopback (as `nobody` when run as root)."""
    if not (PG_BIN / "initdb").exists():
        unavailable(f"PostgreSQL not found at {PG_BIN}: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="slurm-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    server = Postgres(root, free_port(), as_user)
    subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(root / "db"), "-A", "trust", "-U", "sweep", "--no-sync"],
                   check=True, capture_output=True)
    server.start()
    try:
        yield server
    finally:
        server.stop(check=False)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL 15 on loopback; yields its URL."""
    with postgres() as server:
        yield server.url
