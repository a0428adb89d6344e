"""Health, readiness, metrics and status over real HTTP (TCP and the Unix socket);
`policy-agent status` against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from agent_helpers import ManualSource, make_pod, wait_for
from obs_helpers import http_get, short_dir

from policy_agent.agent import Agent
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.obs.server import ObsServer
from policy_agent.sources.events import SourceError


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


@pytest.fixture
def running(tmp_path):
    src = ManualSource("kube")
    agent = Agent(NodeConfig("n1"), Dataplane(kernel=FakeKernel()), [src], status_dir=str(tmp_path / "st"),
                  min_interval=0.0, refresh_interval=0)
    with short_dir() as d:
        server = ObsServer(agent, "127.0.0.1", 0, socket_path=os.path.join(d, "agent.sock"))
        server.start()
        agent.start()
        try:
            yield agent, server, src
        finally:
            agent.stop()
            server.stop()


def _unix(server, path: str) -> tuple[int, str, str]:
    return http_get(server.socket_path, path)


def test_health_ready_metrics_status(running):
    agent, server, src = running
    base = server.url
    assert server.address[0] == "127.0.0.1"  # localhost by default
    assert _get(base + "/livez")[0] == 200
    code, _, body = _get(base + "/readyz")
    assert code == 503 and "waiting for sources: kube" in body
    assert _get(base + "/status")[0] == 404  # pod and policy names: not on TCP by default
    s = json.loads(_unix(server, "/status")[2])
    assert s["in_sync"] is False and s["ready"] is False and s["last_apply_time"] is None

    src.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"])})
    src.sink(SourceError("kube", "Pod watch: connection reset", "Pod"))
    src.in_sync()
    wait_for(lambda: _get(base + "/readyz")[0] == 200, what="ready over HTTP")

    code, ctype, text = _get(base + "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert metrics["policy_agent_apply_duration_seconds_count"] >= 1
    assert metrics['policy_agent_event_to_enforced_seconds_count{kind="Pod"}'] == 1
    assert metrics['policy_agent_rules_programmed{family="4"}'] > 0
    assert metrics["policy_agent_local_endpoints"] == 1
    assert metrics["policy_agent_ready"] == 1
    assert metrics['policy_agent_errors_total{source="kube",stage="source"}'] == 1
    assert metrics['policy_agent_watch_restarts_total{source="kube"}'] == 1

    code, ctype, body = _unix(server, "/status")
    s = json.loads(body)
    assert ctype == "application/json"
    assert s["in_sync"] and s["ready"] and s["applies"] >= 1
    assert s["last_apply_duration_seconds"] > 0 and s["pending_events"] == 0
    assert s["counts"]["pods"] == 1 and s["counts"]["local_endpoints"] == 1
    assert s["errors"]["recent"][0]["message"] == "Pod watch: connection reset"
    assert _get(base + "/nope")[0] == 404
    # The socket serves the probes' endpoints too (a full copy).
    assert _unix(server, "/readyz")[0] == 200 and _unix(server, "/livez")[0] == 200
    assert "policy_agent_ready 1.0" in _unix(server, "/metrics")[2]


def test_status_command(running):
    agent, server, src = running
    # Default: the Unix socket (its path from the config layers, the environment here).
    env = {"POLICY_AGENT_STATUS_SOCKET": server.socket_path, "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "policy_agent.cli", "status"]
    run = lambda *extra: subprocess.run(cmd + list(extra), capture_output=True, text=True,  # noqa: E731
                                        timeout=60, env=env)
    r = run()
    assert r.returncode == 1 and "ready:         no" in r.stdout, r.stderr  # not ready yet
    src.replace("Pod", {})
    src.in_sync()
    assert agent.wait_ready(30)
    r = run()
    assert r.returncode == 0, r.stderr
    assert "in sync:       yes" in r.stdout and "last apply:" in r.stdout and "took" in r.stdout
    r = run("--json")
    assert json.loads(r.stdout)["ready"] is True and json.loads(r.stdout)["node"] == "n1"
    # --url asks TCP, where /status is not served without the opt-in: a clear error, not a crash.
    r = run("--url", server.url)
    assert r.returncode == 3 and "HTTP 404" in r.stderr and "status_over_tcp" in r.stderr


def test_status_over_tcp_only_when_opted_in(tmp_path):
    src = ManualSource("kube")
    agent = Agent(NodeConfig("n1"), Dataplane(kernel=FakeKernel()), [src], status_dir=str(tmp_path / "st"),
                  min_interval=0.0, refresh_interval=0, gc_freeze=False)
    server = ObsServer(agent, "127.0.0.1", 0, status_over_tcp=True)
    server.start()
    agent.start()
    try:
        src.replace("Pod", {})
        src.in_sync()
        assert agent.wait_ready(30)
        code, ctype, body = _get(server.url + "/status")
        assert code == 200 and json.loads(body)["ready"] is True
        r = subprocess.run([sys.executable, "-m", "policy_agent.cli", "status", "--url", server.url],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "ready:         yes" in r.stdout, r.stderr
    finally:
        agent.stop()
        server.stop()


def test_status_command_agent_down():
    r = subprocess.run([sys.executable, "-m", "policy_agent.cli", "status", "--url", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "cannot reach the agent" in r.stderr
    with short_dir() as d:
        path = os.path.join(d, "agent.sock")
        r = subprocess.run([sys.executable, "-m", "policy_agent.cli", "status", "--status-socket", path],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and f"cannot reach the agent at {path}" in r.stderr
