"""A local stand-in for the W&B cloud API: just enough GraphQL for `wandb sweep` and `wandb agent`.

The W&B cloud is unreachable from CI, so the unmodified W&B client (the `wandb agent` CLI, `wandb.sweep`)
is pointed at this server with WANDB_BASE_URL. It answers the operations those clients need:

    Viewer        the login check (and any other query of the viewer): a viewer with an entity
    UpsertSweep   `wandb.sweep(config)`: stores the config, returns a sweep name
    SweepWithRuns the sweep's config (a YAML string with method, parameters, command) and its runs: each run
                  handed out (state pending until its upload starts, then running, finished or failed by the
                  exit code its file stream ends with), its config and its summary as the file stream sent it
    CreateAgent   an agent id
    Heartbeat     `agentHeartbeat.commands`: a JSON list of {"type": "run", ...} or {"type": "exit"}

For `wandb sync` of offline runs and for online runs it also stores what an upload sends (runs, run
files, artifact versions with their files, metadata and aliases): tests/fake_uploads.py.

    api.versions("mnist-convnet")  # [FakeArtifact(name, type, version, metadata, aliases, files {path: bytes}, ...)]
    api.requests                   # [(operation, variables)] of every GraphQL request, in order

Anything else (telemetry) gets an empty 200, the file stream `{}`. It serves one grid sweep: each
grid point is handed out once, to an agent with no run in progress, and every hand-out is recorded.
`duplicates=k` hands each of the first k points to two agents at once, as the real server
sometimes does when agents start together, so the agents' duplicate detection can be exercised.

    with FakeWandb(spec_dict, duplicates=1) as api:   # api.url -> http://127.0.0.1:PORT
        ... WANDB_BASE_URL=api.url wandb agent api.sweep_path ...
        api.assignments   # [Assignment(agent_id, host, run_id, params, duplicate_of, command), ...]
        api.requeue(run_id)  # hand a preempted run out again, as W&B does, as a "resume" command

An early_terminate sweep's stops: W&B's server answers the heartbeat of an agent whose run falls behind
with `{"type": "stop", "run_id": ...}` (hyperband). `early_stop` lists the params of the runs to stop:

    api.early_stop.append({"epochs": 30})  # every heartbeat reporting such a run running answers `stop`
    api.stops                             # [run_id, ...] of each stop sent, in order

A run of the sweep that another agent, elsewhere, finished and uploaded (what the server then holds):

    api.record_run("other123", {"learning_rate": 0.5}, {"val_accuracy": 0.99})

An outage: the server goes away under a running agent, as a closed port (`go_away`: connections are
refused) or as a host that accepts connections and never answers (`go_silent`: a listening socket on
the same port that takes each connection and holds it, reading nothing).

    api.go_silent()   # or api.go_away()
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml
from fake_uploads import UPLOAD_OPERATIONS, Uploads, new_id  # tests/ is on sys.path under pytest

from app.sweep import spec as sweep_spec

ENTITY, PROJECT = "fake-entity", "fake-project"
KNOWN = ("UpsertSweep", "SweepWithRuns", "CreateAgent", "Heartbeat", *UPLOAD_OPERATIONS)
OPERATION = re.compile(r"\b(?:query|mutation)\s+(\w+)")


@dataclass
class Assignment:
    agent_id: str
    host: str  # the agent's hostname: the container id under docker
    run_id: str
    params: dict[str, Any]
    duplicate_of: str | None = None  # run id of the first hand-out of the same params
    command: str = "run"  # "resume": a requeued run handed out again under its own id


class FakeWandb(Uploads):
    def __init__(self, config: dict | None = None, *, duplicates: int = 0, sweep_id: str = "fakeswp1",
                 entity: str = ENTITY, project: str = PROJECT, host: str = "127.0.0.1", port: int = 0):
        self.entity, self.project = entity, project
        self.duplicates = duplicates
        self.hold_open = False  # True: idle agents wait for work (a requeue) instead of being told to exit
        self.lock = threading.Lock()
        self.operations: list[str] = []  # every operation name (or path) received, in order
        self.assignments: list[Assignment] = []
        self.agents: dict[str, str] = {}  # agent id -> host
        self.sweeps: dict[str, dict] = {}  # sweep id -> config
        self.sweep_id = sweep_id
        self._queue: list[dict[str, Any]] = []
        self._copies: list[Assignment] = []  # duplicate hand-outs still owed to another agent
        self._requeued: list[Assignment] = []  # preempted runs to hand out again, same run id
        self.early_stop: list[dict[str, Any]] = []  # params of runs told to stop while they run (hyperband)
        self.stops: list[str] = []  # run id of every stop command sent
        self.requests: list[tuple[str, dict[str, Any]]] = []  # (operation, variables) of every GraphQL request
        self.summaries: dict[str, dict[str, Any]] = {}  # run id -> its summary, as its file stream last sent it
        self.exit_codes: dict[str, int] = {}  # run id -> the exit code its file stream ended with
        self.init_uploads()
        if config is not None:
            self._serve(sweep_id, config)
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._stopped = False
        self._silent: socket.socket | None = None
        self._held: list[socket.socket] = []  # connections the silent socket took and never answers

    # --- lifecycle ---
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def sweep_path(self) -> str:
        return f"{self.entity}/{self.project}/{self.sweep_id}"

    def start(self) -> "FakeWandb":
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.shutdown()
            self._server.server_close()
        if self._silent is not None:
            self._silent.close()
            for conn in self._held:
                conn.close()

    def go_away(self) -> None:
        """The server is gone: its port refuses connections."""
        self.stop()

    def go_silent(self) -> None:
        """The server stops answering: its port still accepts connections, and nothing is ever sent back."""
        address = self._server.server_address[:2]
        self.stop()
        self._silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._silent.bind(address)
        self._silent.listen(64)

        def hold() -> None:
            while True:
                try:
                    conn, _ = self._silent.accept()
                except OSError:
                    return  # closed by stop()
                self._held.append(conn)

        threading.Thread(target=hold, daemon=True).start()

    def __enter__(self) -> "FakeWandb":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the sweep ---
    def _serve(self, sweep_id: str, config: dict) -> None:
        spec = sweep_spec.parse(config)
        if spec.method != "grid":
            raise ValueError("the fake W&B server serves grid sweeps only")
        self.sweeps[sweep_id] = config
        self.sweep_id = sweep_id
        self._queue = spec.grid()

    def requeue(self, run_id: str) -> None:
        """What the server does once a run marked preempting stops: the next idle agent resumes it."""
        with self.lock:
            first = next(a for a in self.assignments if a.run_id == run_id)
            self._requeued.append(first)

    def record_run(self, run_id: str, params: dict[str, Any], summary: dict[str, Any], exit_code: int = 0) -> None:
        """A run of this sweep finished and uploaded by an agent elsewhere."""
        with self.lock:
            self.runs[run_id] = {"name": run_id, "sweep": self.sweep_id,
                                 "config": json.dumps({k: {"value": v} for k, v in params.items()})}
            self.summaries[run_id], self.exit_codes[run_id] = summary, exit_code

    def _sweep_runs(self, name: str) -> list[dict[str, Any]]:
        """The sweep's runs as SweepWithRuns's edges: the ones handed out, then others uploaded into it."""
        with self.lock:
            ids = [a.run_id for a in self.assignments] if name == self.sweep_id else []
            ids += [run_id for run_id, run in self.runs.items() if run.get("sweep") == name]
            edges = []
            for run_id in dict.fromkeys(ids):
                params = next((a.params for a in self.assignments if a.run_id == run_id), {})
                uploaded = self.runs.get(run_id)
                code = self.exit_codes.get(run_id)
                state = ("pending" if uploaded is None else "running" if code is None else
                         "finished" if code == 0 else "failed")
                config = (uploaded or {}).get("config") or json.dumps({k: {"value": v} for k, v in params.items()})
                edges.append({"node": {"name": run_id, "state": state, "config": config, "exitcode": code,
                                       "heartbeatAt": None, "shouldStop": False, "failed": state == "failed",
                                       "stopped": False, "running": state == "running",
                                       "summaryMetrics": json.dumps(self.summaries.get(run_id, {})),
                                       "sampledHistory": []}})
        return edges

    def _file_stream(self, path: str, body: dict[str, Any]) -> None:
        """A run's stream: its summary (each update carries the whole of it) and, at its end, its exit code."""
        run_id = path.rstrip("/").split("/")[-2]
        content = ((body.get("files") or {}).get("wandb-summary.json") or {}).get("content") or []
        with self.lock:
            if content:
                self.summaries[run_id] = json.loads(content[-1])
            if body.get("complete") and body.get("exitcode") is not None:
                self.exit_codes[run_id] = body["exitcode"]

    def runs_of(self, params: dict[str, Any]) -> list[Assignment]:
        return [a for a in self.assignments if a.params == params]

    def _next_command(self, agent_id: str, busy: bool) -> list[dict[str, Any]]:
        if busy:
            return []  # the real server hands an agent one run at a time
        with self.lock:
            copy = next((c for c in self._copies if c.agent_id != agent_id), None)
            if self._requeued:
                old = self._requeued.pop(0)
                assignment = Assignment(agent_id, self.agents.get(agent_id, ""), old.run_id, old.params, command="resume")
            elif copy is not None:
                self._copies.remove(copy)
                assignment = Assignment(agent_id, self.agents.get(agent_id, ""), new_id(), copy.params, copy.run_id)
            elif self._queue:
                assignment = Assignment(agent_id, self.agents.get(agent_id, ""), new_id(), self._queue.pop(0))
                if sum(1 for a in self.assignments if a.duplicate_of is None) < self.duplicates:
                    self._copies.append(assignment)  # the next other idle agent gets the same params
            elif self._copies or self.hold_open:
                return []  # a copy is owed to another agent: keep this one waiting, not exiting
            else:
                return [{"type": "exit"}]
            self.assignments.append(assignment)
        args = {k: {"value": v} for k, v in assignment.params.items()}
        return [{"type": assignment.command, "run_id": assignment.run_id, "args": args, "program": None}]

    def _stop_commands(self, states: dict[str, bool]) -> list[dict[str, Any]]:
        """`stop` for each run the agent reports running whose params are in early_stop."""
        with self.lock:
            stop = [a.run_id for a in self.assignments
                    if states.get(a.run_id) and a.params in self.early_stop]
            self.stops.extend(stop)
        return [{"type": "stop", "run_id": run_id} for run_id in stop]

    # --- GraphQL ---
    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        query = body.get("query", "")
        variables = body.get("variables") or {}
        match = OPERATION.search(query)
        op = body.get("operationName") or (match.group(1) if match else "")
        with self.lock:
            self.operations.append(op or "?")
            self.requests.append((op or "?", variables))
        upload = self.answer_upload(op, variables)
        if upload is not None:
            return upload
        viewer = {"id": "dmlld2VyOjE=", "entity": self.entity, "username": "fake-user", "email": "fake@example.invalid",
                  "admin": False, "flags": "{}", "teams": {"edges": [{"node": {"name": self.entity}}]}}
        project = {"id": "cHJvamVjdDox", "name": variables.get("projectName") or variables.get("project") or self.project,
                   "entity": {"id": "ZW50aXR5OjE=", "name": variables.get("entityName") or variables.get("entity") or self.entity}}
        if op in ("Viewer", "GetDefaultEntity") or (op not in KNOWN and "viewer" in query):
            return {"data": {"viewer": viewer}}
        if op == "UpsertSweep":
            config = yaml.safe_load(variables.get("config") or "{}")
            sweep_id = variables.get("id") or new_id()
            with self.lock:
                self.sweeps[sweep_id] = config
            return {"data": {"upsertSweep": {"sweep": {"name": sweep_id, "project": project},
                                             "configValidationWarnings": []}}}
        if op == "SweepWithRuns":
            name = variables.get("sweep")
            config = self.sweeps.get(name)
            if config is None:
                return {"data": {"project": {"sweep": None}}}
            sweep = {"id": "c3dlZXA6MQ==", "name": name, "method": config.get("method"), "state": "RUNNING",
                     "description": None, "config": yaml.safe_dump(config), "createdAt": "2026-01-01T00:00:00",
                     "heartbeatAt": None, "updatedAt": None, "earlyStopJobRunning": False, "bestLoss": None,
                     "controller": None, "scheduler": None, "runs": {"edges": self._sweep_runs(name)}}
            return {"data": {"project": {"sweep": sweep}}}
        if op == "CreateAgent":
            agent_id = new_id()
            with self.lock:
                self.agents[agent_id] = variables.get("host", "")
            return {"data": {"createAgent": {"agent": {"id": agent_id}}}}
        if op == "Heartbeat":
            agent_id = variables.get("id", "")
            states = json.loads(variables.get("runState") or "{}")
            commands = self._stop_commands(states) or self._next_command(agent_id, busy=any(states.values()))
            return {"data": {"agentHeartbeat": {"agent": {"id": agent_id}, "commands": json.dumps(commands)}}}
        return {}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                reply: dict[str, Any] = {}
                if self.path.rstrip("/").endswith("/graphql"):
                    try:
                        reply = fake.answer(json.loads(raw or b"{}"))
                    except json.JSONDecodeError:
                        reply = {}
                else:
                    with fake.lock:
                        fake.operations.append(self.path)
                    if self.path.endswith("/file_stream"):
                        try:
                            fake._file_stream(self.path, json.loads(raw or b"{}"))
                        except (json.JSONDecodeError, AttributeError):
                            pass  # a stream we do not read: accepted all the same
                        reply = {"exitcode": None, "limits": {}}  # the run's history stream: accepted
                payload = json.dumps(reply).encode() if reply else b""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_PUT(self):  # noqa: N802: uploads to the URLs handed out above
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                key = self.path.rsplit("/", 1)[-1]
                stored = self.path.startswith("/storage/") and fake.store(key, body)
                md5 = self.headers.get("Content-MD5")
                if stored and md5 and md5 != base64.b64encode(hashlib.md5(body).digest()).decode():
                    stored = False  # what S3/GCS do with a body that doesn't match its Content-MD5
                self.send_response(200 if stored else 400)
                self.send_header("ETag", '"' + hashlib.md5(body).hexdigest() + '"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):  # noqa: N802
                with fake.lock:
                    fake.operations.append(f"GET {self.path}")
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):  # keep pytest output quiet
                pass

        return Handler
