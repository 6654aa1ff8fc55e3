"""`python -m app launch`: N sweep-agent containers, each pinned to one GPU, from one terminal.

    python -m app launch --agents 4 --gpus 0,1     # agents 1,3 on GPU 0 and agents 2,4 on GPU 1
    python -m app launch --agents 2 --cpu          # no NVIDIA runtime: CPU agents (ALLOW_CPU=true)

The agents serve SWEEP_ID (a W&B sweep, through `wandb agent`) or, without one, SWEEP_CONFIG (an
offline sweep, e.g. SWEEP_CONFIG=/app/sweeps/grid.yaml: its journal on the shared ./runs), from --env-file.

`docker compose up --scale agent=N` gives every replica the same GPUs; here each container gets a device
request for its own GPU (round robin over --gpus), so the runtime exposes only that GPU to it. Agents
sharing a GPU are told how many they are (AGENTS_PER_GPU), which sets each one's memory share. The
containers get docker-compose.yml's mounts (./data ./runs ./outputs of --project-dir, by default the
current folder), run as the calling user and read the same .env. Their logs stream here prefixed `agent-1 | `; Ctrl-C (or SIGTERM) stops all of
them with a grace period, so the runs checkpoint and are requeued; a second Ctrl-C kills them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from app import settings
from app.errors import UserError

IMAGE = settings.setting("APP_IMAGE").default
GRACE_S = 60  # as docker-compose.yml's stop_grace_period: the run checkpoints within the current batch
SHM_SIZE = "1g"  # as docker-compose.yml: PyTorch shares tensors between processes through /dev/shm
LABEL = "app.launch"  # on every container we start; the value is this launch's name prefix
VOLUMES = ("data", "runs", "outputs")  # ./NAME on the host -> /NAME in the container, like compose
CONTAINER_DIRS = {"DATA_DIR": "/data", "WANDB_DIR": "/runs", "OUTPUT_DIR": "/outputs"}
USAGE = "usage: python -m app launch --agents N [--gpus 0,1] [--cpu] [--image IMAGE] [--env-file .env]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"launch: {message} ({USAGE})")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m app launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, required=True, help="agent containers to start")
    p.add_argument("--gpus", help="host GPU ids (or GPU-UUIDs) to spread them over, e.g. 0,1 (default: every GPU nvidia-smi lists)")
    p.add_argument("--cpu", action="store_true", help="no GPUs: start CPU agents (hosts without the NVIDIA runtime)")
    p.add_argument("--image", default=settings.get("APP_IMAGE"), help=f"image to run (default {IMAGE}, or APP_IMAGE)")
    p.add_argument("--env-file", default=".env", help="settings for the agents, as compose's env_file (default .env)")
    p.add_argument("--project-dir", default=".", help="folder holding data/ runs/ outputs/ (default: the current one)")
    p.add_argument("--network", help="docker network for the agents (e.g. host, to reach a W&B server on this host's loopback)")
    p.add_argument("--name", default="mnist-agent", help="container name prefix (default mnist-agent)")
    p.add_argument("--grace", type=int, default=GRACE_S, help=f"seconds each agent gets to checkpoint on stop (default {GRACE_S})")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="extra setting for every agent (repeatable)")
    args = p.parse_args(argv)
    if args.agents < 1:
        raise UserError(f"--agents={args.agents} must be at least 1")
    if args.grace < 1:
        raise UserError(f"--grace={args.grace} must be at least 1 second")
    if args.cpu and args.gpus:
        raise UserError("--cpu and --gpus exclude each other: choose GPUs or the CPU")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        raise UserError(f"--name={args.name!r} must be a container name: letters, digits, _ . -")
    return args


def parse_gpus(text: str) -> list[str]:
    ids = [g.strip() for g in text.split(",")]
    for g in ids:
        if not (g.isdigit() or re.fullmatch(r"(GPU|MIG)-[0-9A-Fa-f-]+(/\d+/\d+)?", g)):
            raise UserError(f"--gpus={text!r}: {g!r} is not a GPU index or UUID; use e.g. --gpus 0,1")
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpus={text!r} names a GPU twice; list each once (agents are spread over them)")
    return ids


def host_gpus() -> list[str]:
    """GPU indexes `nvidia-smi -L` lists on this host ([] without a driver)."""
    from app.container.gpu_slots import smi_count

    return [str(i) for i in range(smi_count())]


def read_env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise UserError(f"--env-file {str(path)!r} not found: copy .env.example to .env and set SWEEP_ID (or pass --env-file)")
    from app import sources

    return sources.read_dotenv(path)  # checked as every .env: a bad line or unknown key is one error line


@dataclass
class Agent:
    number: int  # 1-based, as in the log prefix
    gpu: str | None
    environment: dict[str, str]
    container: object = None
    exit_code: int | None = None
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"agent-{self.number}"


def plan(agents: int, gpus: list[str] | None, base_env: dict[str, str]) -> list[Agent]:
    """Round robin over the GPUs; every agent knows how many share its GPU (its memory share)."""
    out = []
    for i in range(agents):
        env = dict(base_env)
        gpu = None
        if gpus:
            gpu = gpus[i % len(gpus)]
            sharing = len(range(i % len(gpus), agents, len(gpus)))
            env.update(NVIDIA_VISIBLE_DEVICES=gpu, AGENTS_PER_GPU=str(sharing))
        out.append(Agent(i + 1, gpu, env))
    return out


def container_env(args: argparse.Namespace, project_dir: Path) -> dict[str, str]:
    env = read_env_file(Path(args.env_file))
    for item in args.env:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise UserError(f"-e {item!r} must be KEY=VALUE")
        env[k] = v
    if not settings.is_set("SWEEP_ID", env) and not settings.is_set("SWEEP_CONFIG", env):
        raise UserError(f"neither SWEEP_ID nor SWEEP_CONFIG is set in {args.env_file} (or -e): for a W&B sweep "
                        "run `python -m app sweep create sweeps/grid.yaml` and put its SWEEP_ID line there; for an "
                        "offline sweep set SWEEP_CONFIG=/app/sweeps/grid.yaml")
    env.update(CONTAINER_DIRS)  # a host .env's DATA_DIR=data must not redirect the container's mounts
    # the entrypoint's agent mode serves SWEEP_ID through `wandb agent` and SWEEP_CONFIG as an offline sweep
    env.setdefault("APP_MODE", "agent")
    if args.cpu:
        env["ALLOW_CPU"] = "true"
    return env


def docker_client():
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client
    except Exception as exc:  # DockerException, connection refused, permission denied on the socket
        raise UserError(f"cannot reach the Docker engine ({str(exc).splitlines()[0][:160]}); start it or check DOCKER_HOST") from None


class Launcher:
    def __init__(self, client, image: str, project_dir: Path, name: str, grace: int, network: str | None = None,
                 out=sys.stdout):
        self.client, self.image, self.project_dir, self.name, self.grace = client, image, project_dir, name, grace
        self.network = network
        self.out = out
        self.agents: list[Agent] = []
        self._print_lock = threading.Lock()
        self._signals = 0
        self._first_signal = 0

    def say(self, line: str) -> None:
        with self._print_lock:
            print(line, file=self.out, flush=True)

    def _volumes(self) -> dict[str, dict[str, str]]:
        vols = {}
        for name in VOLUMES:
            host = (self.project_dir / name).resolve()
            host.mkdir(parents=True, exist_ok=True)  # owned by the caller, as the containers run as the caller
            vols[str(host)] = {"bind": f"/{name}", "mode": "rw"}
        return vols

    def container_kwargs(self, agent: Agent) -> dict:
        """docker SDK `containers.run` arguments for one agent: its GPU as a device request."""
        from docker.types import DeviceRequest

        requests = [DeviceRequest(device_ids=[agent.gpu], capabilities=[["gpu"]])] if agent.gpu is not None else []
        return dict(
            image=self.image, detach=True, name=f"{self.name}-{agent.number}", environment=agent.environment,
            volumes=self._volumes(), device_requests=requests, user=f"{os.getuid()}:{os.getgid()}",
            shm_size=SHM_SIZE, labels={LABEL: self.name}, stop_signal="SIGTERM",
            **({"network_mode": self.network} if self.network else {}),
        )

    def _free_name(self, name: str) -> None:
        import docker

        try:
            old = self.client.containers.get(name)
        except docker.errors.NotFound:
            return
        if old.status == "running":
            raise UserError(f"container {name} is already running: stop it (docker stop {name}) or choose --name")
        old.remove(force=True)  # a stopped leftover of an earlier launch

    def start(self, agents: list[Agent]) -> None:
        import docker

        try:
            self.client.images.get(self.image)
        except docker.errors.ImageNotFound:
            raise UserError(f"image {self.image!r} not found: build it with scripts/build-image (or pass --image)") from None
        for agent in agents:
            if self._signals:
                break  # Ctrl-C while starting: start no more
            kwargs = self.container_kwargs(agent)
            name = kwargs["name"]
            self._free_name(name)
            try:
                agent.container = self.client.containers.run(**kwargs)
            except docker.errors.APIError as exc:
                with contextlib.suppress(docker.errors.APIError):
                    self.client.containers.get(name).remove(force=True)  # created, but it could not start
                self.stop_all()
                reason = exc.explanation or str(exc)
                if agent.gpu is not None and "gpu" in str(reason).lower():
                    raise UserError(f"{name} could not get GPU {agent.gpu} ({reason}); is the NVIDIA container "
                                    "runtime installed? Use --cpu on hosts without GPUs") from None
                raise UserError(f"{name} did not start: {reason}") from None
            self.agents.append(agent)
            where = f"GPU {agent.gpu}" if agent.gpu is not None else "CPU"
            self.say(f"{agent.prefix} | started {name} ({agent.container.short_id}) on {where}")
            for target in (self._stream, self._wait):
                t = threading.Thread(target=target, args=(agent,), daemon=True)
                t.start()
                agent.threads.append(t)

    def _stream(self, agent: Agent) -> None:
        buffer = b""
        try:
            for chunk in agent.container.logs(stream=True, follow=True):
                buffer += chunk
                *lines, buffer = re.split(rb"\r?\n|\r", buffer)  # tqdm's \r updates become lines too
                for line in lines:
                    if line.strip():
                        self.say(f"{agent.prefix} | {line.decode(errors='replace')}")
        except Exception:  # the container was removed under us: nothing more to show
            pass
        if buffer.strip():
            self.say(f"{agent.prefix} | {buffer.decode(errors='replace')}")

    def _wait(self, agent: Agent) -> None:
        try:
            agent.exit_code = int(agent.container.wait().get("StatusCode", 1))
        except Exception:
            agent.exit_code = 1
        self.say(f"{agent.prefix} | exited with code {agent.exit_code}")

    def _stop_one(self, agent: Agent, kill: bool) -> None:
        try:
            if kill:
                agent.container.kill()
            else:
                agent.container.stop(timeout=self.grace)  # SIGTERM, then SIGKILL after the grace period
        except Exception:
            pass  # already gone

    def stop_all(self, kill: bool = False) -> None:
        threads = [threading.Thread(target=self._stop_one, args=(a, kill), daemon=True) for a in self.agents]
        for t in threads:
            t.start()  # in parallel: N agents checkpoint in one grace period, not N of them

    def on_signal(self, signum, frame) -> None:
        self._signals += 1
        if self._signals == 1:
            self._first_signal = signum
            self.say(f"launch | {signal.Signals(signum).name}: stopping {len(self.agents)} agent(s), "
                     f"up to {self.grace}s to checkpoint (again to kill)")
            self.stop_all()
        else:
            self.say("launch | killing the agents")
            self.stop_all(kill=True)

    def wait(self) -> int:
        for agent in self.agents:
            for t in agent.threads:
                while t.is_alive():
                    t.join(0.2)  # short joins: signals are handled between them
        for agent in self.agents:
            try:
                agent.container.remove()
            except Exception:
                pass
        codes = [a.exit_code for a in self.agents]
        failed = [f"{a.prefix}={a.exit_code}" for a in self.agents if a.exit_code]
        if self._signals:
            self.say(f"launch | stopped: exit codes {', '.join(f'{a.prefix}={a.exit_code}' for a in self.agents)}")
            return 128 + self._first_signal
        if failed:
            self.say(f"launch | agents failed: {', '.join(failed)}")
            return 1
        self.say(f"launch | all {len(codes)} agent(s) finished")
        return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    args = parse_args(argv)
    project_dir = Path(args.project_dir)
    gpus = parse_gpus(args.gpus) if args.gpus else None
    env = container_env(args, project_dir)
    if not args.cpu and gpus is None:
        gpus = host_gpus()
        if not gpus:
            raise UserError("no GPU found on this host (nvidia-smi lists none): pass --gpus 0,1 or use --cpu")
    agents = plan(args.agents, gpus, env)
    client = docker_client()
    launcher = Launcher(client, args.image, project_dir, args.name, args.grace, args.network)
    old = {s: signal.signal(s, launcher.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start(agents)
        return launcher.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
