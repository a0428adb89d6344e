"""Readiness under failing applies, generations and the GC freeze, over real HTTP."""

from __future__ import annotations

import gc
import json
import os
import urllib.error
import urllib.request

import pytest
from agent_helpers import ManualSource, iface, make_pod, wait_for
from obs_helpers import http_get, short_dir

from policy_agent import logs
from policy_agent.agent import Agent
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.obs.server import ObsServer
from policy_agent.shared.endpoint import EndpointRecord
from policy_agent.sources.events import Upsert


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _status(server) -> dict:
    code, _, body = http_get(server.socket_path, "/status")  # root-only Unix socket
    assert code == 200
    return json.loads(body)


def _metric(server, name: str) -> float | None:
    _, text = _get(server.url + "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@pytest.fixture
def make(tmp_path):
    # Plain tracebacks, as the entry points log them: the unconfigured default renders every
    # frame's locals (megabytes per failed apply), which alone takes longer than these waits.
    logs.configure("console", "info")
    made = []
    with short_dir() as sock_dir:

        def start(**kw):
            kernel = FakeKernel()
            kube, cni = ManualSource("kube"), ManualSource("cni")
            kw.setdefault("gc_freeze", False)
            agent = Agent(NodeConfig("n1"), Dataplane(kernel=kernel, retries=1, backoff=0.0), [kube, cni],
                          status_dir=str(tmp_path / "st"), min_interval=0.0, refresh_interval=0, **kw)
            server = ObsServer(agent, "127.0.0.1", 0, socket_path=os.path.join(sock_dir, f"a{len(made)}.sock"))
            server.start()
            agent.start()
            made.append((agent, server))
            kube.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"])})
            kube.in_sync()
            cni.replace("Endpoint", {})
            cni.in_sync()
            wait_for(lambda: _get(server.url + "/readyz")[0] == 200, what="ready")
            return agent, server, kernel, kube, cni

        yield start
        for agent, server in made:
            agent.stop()
            server.stop()


def test_readyz_turns_503_after_consecutive_failures_and_back_after_recovery(make):
    agent, server, kernel, kube, _ = make()
    assert _metric(server, "policy_agent_apply_consecutive_failures") == 0
    kernel.fail_next = 10**6
    kube.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"]),
                         ("x", "b"): make_pod("x", "b", ["10.233.0.11"])})
    wait_for(lambda: _get(server.url + "/readyz")[0] == 503, timeout=60, what="unready")
    code, body = _get(server.url + "/readyz")
    assert code == 503 and "applies failed" in body and "injected failure" in body
    assert _get(server.url + "/livez")[0] == 200  # no restart loop: the old rules still enforce
    st = _status(server)
    assert st["apply_failures"]["consecutive"] >= 3 and "injected failure" in st["apply_failures"]["last_error"]
    assert st["healthy"] is False and "applies failed" in st["unready_reason"]
    assert st["applied_generation"] < st["observed_generation"]
    assert _metric(server, "policy_agent_apply_consecutive_failures") >= 3
    wait_for(lambda: _metric(server, "policy_agent_ready") == 0, what="ready gauge 0")
    # The raw error is for root (socket), not for every local user of the TCP port.
    text = http_get(server.socket_path, "/metrics")[2]
    assert 'policy_agent_last_apply_error_info{error="' in text and "injected failure" in text
    _, text = _get(server.url + "/metrics")
    assert "policy_agent_last_apply_error" not in text and "injected failure" not in text
    assert "policy_agent_apply_consecutive_failures" in text

    kernel.fail_next = 0  # the kernel recovers: the retry (backoff <= 10 s) succeeds
    wait_for(lambda: _get(server.url + "/readyz")[0] == 200, timeout=60, what="ready again")
    st = _status(server)
    assert st["apply_failures"]["consecutive"] == 0 and st["healthy"] is True
    assert st["applied_generation"] == st["observed_generation"]
    assert iface("x", "b") in kernel.iptables_save(4)
    wait_for(lambda: _metric(server, "policy_agent_ready") == 1, what="ready gauge")


def test_readyz_turns_503_when_a_change_waits_too_long(make):
    agent, server, kernel, kube, _ = make(unready_failures=10**6, unready_after=0.5)
    kernel.fail_next = 10**6
    kube.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"]),
                         ("x", "b"): make_pod("x", "b", ["10.233.0.11"])})
    wait_for(lambda: _get(server.url + "/readyz")[0] == 503, timeout=60, what="unready")
    code, body = _get(server.url + "/readyz")
    assert "without a successful apply" in body and "injected failure" in body
    assert _status(server)["apply_failures"]["oldest_unapplied_age_seconds"] > 0.5
    kernel.fail_next = 0
    wait_for(lambda: _get(server.url + "/readyz")[0] == 200, timeout=60, what="ready again")
    assert _status(server)["apply_failures"]["oldest_unapplied_age_seconds"] is None


def test_bad_unready_settings_are_refused():
    with pytest.raises(ValueError, match="unready"):
        Agent(NodeConfig("n1"), Dataplane(kernel=FakeKernel()), [], unready_failures=0)


def test_generations_say_when_a_change_is_enforced(make):
    agent, server, kernel, kube, cni = make()
    st = _status(server)
    assert isinstance(st["observed_generation"], int) and st["observed_generation"] >= 1
    assert st["applied_generation"] == st["observed_generation"]
    g0 = st["observed_generation"]

    # A relist of identical objects changes nothing in the store: no new generation.
    kube.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"])})
    wait_for(lambda: _status(server)["pending_events"] == 0, what="relist handled")
    assert _status(server)["observed_generation"] == g0

    # A change: observed moves at once, applied follows once the kernel has it.
    kube.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"]),
                         ("x", "c"): make_pod("x", "c", ["10.233.0.12"])})
    wait_for(lambda: _status(server)["observed_generation"] == g0 + 1, what="change observed")
    wait_for(lambda: _status(server)["applied_generation"] == g0 + 1, what="change applied")
    assert iface("x", "c") in kernel.iptables_save(4)

    # A change that needs no kernel write (a CNI record with the IP the API has) is covered too.
    cni.sink(Upsert("cni", "Endpoint", ("x", "c"), EndpointRecord("x", "c", "cid", iface("x", "c"), ("10.233.0.12",))))
    wait_for(lambda: _status(server)["observed_generation"] == g0 + 2, what="record observed")
    wait_for(lambda: _status(server)["applied_generation"] == g0 + 2, what="record covered")
    assert _metric(server, "policy_agent_applied_generation") == g0 + 2
    assert _metric(server, "policy_agent_observed_generation") == g0 + 2

    # While applies fail, applied stays behind.
    kernel.fail_next = 10**6
    kube.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"])})
    wait_for(lambda: _status(server)["observed_generation"] == g0 + 3, what="delete observed")
    wait_for(lambda: agent._failures >= 1, what="a failed apply")
    assert _status(server)["applied_generation"] == g0 + 2
    kernel.fail_next = 0
    wait_for(lambda: _status(server)["applied_generation"] == g0 + 3, timeout=60, what="delete applied")


def test_heap_is_frozen_after_the_first_apply(make):
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        agent, *_ = make(gc_freeze=True)
        assert agent.ready
        # The loop freezes right after the apply that made it ready: wait for that step.
        wait_for(lambda: gc.get_freeze_count() > 0, 10, what="heap frozen after the first apply")
    finally:
        gc.unfreeze()


def test_no_freeze_when_disabled(make):
    gc.unfreeze()
    make(gc_freeze=False)
    assert gc.get_freeze_count() == 0
