"""The warm agent's calls to W&B's server, each bounded: a server that goes away is one line, not minutes.

    server = connect(environ)                                # the API key checked within AGENT_OUTAGE_S
    agent_id = server.register(host, sweep_id=..., project=..., entity=...)
    commands = server.heartbeat(agent_id, {run_id: True})   # raises Outage after AGENT_OUTAGE_S with no answer

The calls are the ones `wandb agent` makes (CreateAgent, then agentHeartbeat), sent through W&B's own
service as W&B's `_register_agent`/`_agent_heartbeat` send them. Not those functions themselves: W&B's
heartbeat turns every failure into "no commands" (`[]`), so an agent polling a dead server looks
exactly like one waiting for work, for ever and without a word, each poll held up to 60 s by W&B's own
request timeout. Here a failed call is retried until the server answers or AGENT_OUTAGE_S (app.settings,
60 s by default) have passed since its last answer (a closed port, a host that accepts and then says nothing, a proxy's 502 alike), and
then `Outage` says which server (WANDB_BASE_URL, without any credentials in it) and what failed.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
import urllib.request
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from app import settings

RETRY_S = 2.0  # between tries of a call that failed at once (a refused connection)
PROBE_S = 5.0  # the one direct connection that says what is wrong (probe)
# after the run's stop: its checkpoint takes a batch, an offline run's finish a moment; an online run's
# finish would wait for W&B's service to upload to the server that is gone, minutes
FINISH_S = 20.0
# after the outage's line, for what runs at exit: W&B's service ends in ~2 s, but W&B's own telemetry flushes
# its last export to the same server at exit, 10 s a try and tried again against a host that says nothing
EXIT_S = 5.0

REGISTER = """
mutation CreateAgent($host: String!, $projectName: String, $entityName: String, $sweep: String!) {
    createAgent(input: {host: $host, projectName: $projectName, entityName: $entityName, sweep: $sweep}) {
        agent { id }
    }
}
"""
HEARTBEAT = """
mutation Heartbeat($id: ID!, $metrics: JSONString, $runState: JSONString) {
    agentHeartbeat(input: {id: $id, metrics: $metrics, runState: $runState}) {
        agent { id }
        commands
    }
}
"""


class Outage(Exception):
    """W&B's server gave no answer for AGENT_OUTAGE_S; str() names the server and the last failure."""

    def __init__(self, url: str, problem: str, waited: str):
        super().__init__(f"W&B server {url} (WANDB_BASE_URL) did not answer {waited} ({problem})")


def outage_s(environ: Mapping[str, str]) -> float:
    """How long the server may go without answering before the agent gives up (AGENT_OUTAGE_S): a deploy
    or a network blip passes within the default minute, as the offline sweep's database gets one
    (STATEMENT_TIMEOUT_S)."""
    return settings.get("AGENT_OUTAGE_S", environ)


def connect(environ: Mapping[str, str], timeout_s: float | None = None) -> "Server":
    """W&B's API client for the agent. It checks the API key with the server at once: a server that does
    not answer that check is an outage too, not a traceback. W&B's own timeout for each request (19 s by
    default, the key check's too) is held to AGENT_OUTAGE_S (or `timeout_s`, when shorter), so that a
    short bound holds from the start. The server and key are `environ`'s where it sets them."""
    import wandb
    from wandb.sdk.lib.service.service_connection import WandbApiFailedError

    timeout = min(outage_s(environ), timeout_s or math.inf)
    overrides = {"base_url": settings.get("WANDB_BASE_URL", environ)} if settings.is_set("WANDB_BASE_URL", environ) else None
    try:
        api = wandb.Api(overrides, timeout=max(1, math.ceil(timeout)), api_key=settings.get("WANDB_API_KEY", environ))
        return Server(api, environ)
    except wandb.errors.AuthenticationError as exc:
        failed = exc.__cause__
        status = getattr(getattr(failed, "response", None), "http_status", None)
        if not isinstance(failed, WandbApiFailedError) or (status is not None and status < 500):
            raise  # the server answered: a refused key is W&B's own error
        url = shown_url(environ)
        raise Outage(url, probe(url, first_line(failed)), "the API key check at the start") from None


def outage_line(outage: Outage, run_id: str | None = None, code: int | None = None, cut_short: bool = False) -> str:
    """The one line an outage ends the agent with. `code`: how the run in progress ended (None: it is
    still finishing when `cut_short` ends the process)."""
    if run_id is None:
        what = "no run was in progress"
    elif code is None or code >= 128:
        what = f"run {run_id} checkpointed and marked preempting (its retry resumes from the checkpoint)"
        if cut_short:
            what += (f"; its upload was given up after {FINISH_S:.0f} s: what W&B did not get is in its run "
                     "folder for `wandb sync`")
    else:
        what = f"run {run_id} ended first (exit code {code})"
    return f"error: {outage}; {what}; start the agent again once the server answers"


_said = threading.Lock()


def say_once(line: str) -> None:
    """The outage's line, printed by whichever of the agent and end_after's timer comes first."""
    if _said.acquire(blocking=False):
        print(line, file=sys.stderr, flush=True)


def give_up(line: str) -> int:
    """Say the outage's line and return the exit code 1; the process ends within EXIT_S from now
    whatever its exit handlers still wait for (nothing of a run is left to save by then)."""
    say_once(line)
    end_after(EXIT_S, line)
    return 1


def end_after(seconds: float, line: str) -> threading.Timer:
    """Exit 1 with `line` (unless said already) if the process has not ended itself `seconds` from now."""

    def end() -> None:
        say_once(line)
        sys.stdout.flush()
        os._exit(1)

    timer = threading.Timer(seconds, end)
    timer.daemon = True  # a process that ends in time is not held for it
    timer.start()
    return timer


def shown_url(environ: Mapping[str, str]) -> str:
    """WANDB_BASE_URL as it may be printed: a user:password@ in it is left out."""
    url = settings.get("WANDB_BASE_URL", environ)
    parts = urlsplit(url)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)[:200]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def probe(url: str, said: str) -> str:
    """What is wrong with the server, for its line. W&B's service retries a refused connection itself
    until the call's time is up, so what W&B says is only that its time ran out: one direct connection
    tells a closed port or an unknown host from a host that accepts and then says nothing. Through a
    proxy a direct connection proves nothing: then W&B's words stand."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return said
    try:
        with socket.create_connection((host, port), timeout=PROBE_S):
            return "it accepts connections and sends no answer"
    except socket.gaierror as exc:
        return f"host {host!r} not found ({exc.strerror})"
    except TimeoutError:
        return f"no answer to a connection within {PROBE_S:.0f} s"
    except OSError as exc:
        return f"connecting to {host}:{port}: {exc.strerror or type(exc).__name__}"


class Server:
    def __init__(self, api, environ: Mapping[str, str]):
        self.api = api
        self.url = shown_url(environ)
        self.outage_s = outage_s(environ)
        self.last_answer = time.monotonic()  # the agent starts counting from its own start

    def call(self, query: str, variables: Mapping[str, Any], within: float | None = None) -> dict[str, Any]:
        """One GraphQL call, tried again until the server answers; Outage once it has not for
        AGENT_OUTAGE_S, or `within` seconds from now when that comes first."""
        from wandb.sdk.lib.service.service_connection import WandbApiFailedError
        from wandb.sdk.sweeps import SweepNotFoundError

        problem = "no answer"
        give_up = self.last_answer + self.outage_s
        if within is not None and time.monotonic() + within < give_up:
            give_up, waited = time.monotonic() + within, f"within {within:g} s"
        else:
            waited = f"for {self.outage_s:g} s"
        while True:
            left = give_up - time.monotonic()
            if left <= 0:
                raise Outage(self.url, probe(self.url, problem), waited)
            started = time.monotonic()
            try:
                # W&B's service waits at most `timeout` for the answer (a silent host), then gives up on it
                data = self.api._service_api.execute_graphql(query, variables=dict(variables), timeout=max(left, 1.0))
            except WandbApiFailedError as exc:
                response = getattr(exc, "response", None)
                if response is not None and getattr(response, "http_status", None) == 404:
                    raise SweepNotFoundError("Sweep not found. The sweep may have been deleted.") from exc
                problem = first_line(exc)
            else:
                self.last_answer = time.monotonic()
                return data
            # a refusal comes back at once: wait a little before the next try, never past the bound
            pause = RETRY_S - (time.monotonic() - started)
            if pause > 0:
                time.sleep(min(pause, max(give_up - time.monotonic(), 0.0)))

    def register(self, host: str, *, sweep_id: str, project: str | None, entity: str | None) -> str:
        data = self.call(REGISTER, {"host": host, "projectName": project, "entityName": entity, "sweep": sweep_id})
        return data["createAgent"]["agent"]["id"]

    def heartbeat(self, agent_id: str, run_states: Mapping[str, bool]) -> list[dict[str, Any]]:
        """The server's commands for this agent (run, resume, stop, exit); [] when it has none."""
        data = self.call(HEARTBEAT, {"id": agent_id, "metrics": json.dumps({}), "runState": json.dumps(dict(run_states))})
        return json.loads(data["agentHeartbeat"]["commands"] or "[]")
