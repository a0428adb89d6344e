"""Health, readiness, metrics and status over real HTTP; `policy-agent status` against it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from agent_helpers import ManualSource, make_pod, wait_for

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
    server = ObsServer(agent, "127.0.0.1", 0)
    server.start()
    agent.start()
    try:
        yield agent, server, src
    finally:
        agent.stop()
        server.stop()


def test_health_ready_metrics_status(running):
    agent, server, src = running
    base = server.url
    assert server.address[0] == "127.0.0.1"  # localhost by default
    assert _get(base + "/livez")[0] == 200
    code, _, body = _get(base + "/readyz")
    assert code == 503 and "waiting for sources: kube" in body
    s = json.loads(_get(base + "/status")[2])
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

    code, ctype, body = _get(base + "/status")
    s = json.loads(body)
    assert ctype == "application/json"
    assert s["in_sync"] and s["ready"] and s["applies"] >= 1
    assert s["last_apply_duration_seconds"] > 0 and s["pending_events"] == 0
    assert s["counts"]["pods"] == 1 and s["counts"]["local_endpoints"] == 1
    assert s["errors"]["recent"][0]["message"] == "Pod watch: connection reset"
    assert _get(base + "/nope")[0] == 404


def test_status_command(running):
    agent, server, src = running
    cmd = [sys.executable, "-m", "policy_agent.cli", "status", "--url", server.url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "ready:         no" in r.stdout  # not ready yet
    src.replace("Pod", {})
    src.in_sync()
    assert agent.wait_ready(30)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "in sync:       yes" in r.stdout and "last apply:" in r.stdout and "took" in r.stdout
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["ready"] is True
    # port taken from the config layers (environment here)
    env = {"POLICY_AGENT_METRICS_PORT": str(server.address[1]), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "policy_agent.cli", "status", "--json"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["node"] == "n1"


def test_status_command_agent_down():
    r = subprocess.run([sys.executable, "-m", "policy_agent.cli", "status", "--url", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "cannot reach the agent" in r.stderr
