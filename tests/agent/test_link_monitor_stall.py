"""The link monitor never holds an apply back: a netlink socket that blocks (before or after
the first dump) or a monitor thread that dies leaves the agent applying policy changes in
bounded time, and /status reports the link source unhealthy. Real netlink in a lab netns;
the kernel the agent writes to is the fake one (the claim is about the loop, not iptables)."""

from __future__ import annotations

import threading
import time

import pytest
from agent_helpers import deny_all, make_ns, make_pod, wait_for
from pyroute2 import AsyncIPRoute

from policy_agent.agent import Agent, PushSource
from policy_agent.commands.status import render
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.lab import netns
from policy_agent.sources.links import LinkSource

pytestmark = pytest.mark.kernel

BOUND = 5.0  # seconds an apply may take here; each one is milliseconds with the fake kernel


@pytest.fixture
def node():
    with netns.scratch("h6", "lnk") as name:
        yield name


@pytest.fixture
def release():
    """Unblocks the stalled netlink call at the end, so the monitor thread can finish."""
    ev = threading.Event()
    yield ev
    ev.set()


def _agent(node: str):
    kube = PushSource("kube", {"Namespace": {"x": make_ns("x")},
                               "Pod": {("x", "a"): make_pod("x", "a", ["10.233.0.10"])}})
    links = LinkSource("eni", netns=node, stall_after=1.0)
    kernel = FakeKernel()
    agent = Agent(NodeConfig("n1"), Dataplane(kernel=kernel), [kube, links], min_interval=0.0,
                  refresh_interval=0, gc_freeze=False)
    return agent, kube, links, kernel


def _policy_change_is_enforced_in_bounded_time(agent: Agent, kube: PushSource, kernel: FakeKernel) -> float:
    t0 = time.monotonic()
    kube.upsert("NetworkPolicy", ("x", "deny-all"), deny_all("x"))
    wait_for(lambda: agent.observed_generation > 0 and agent.applied_generation == agent.observed_generation
             and "deny-all" in kernel.iptables_save(4), timeout=BOUND, what="policy enforced")
    return time.monotonic() - t0


def _links_health(agent: Agent) -> dict:
    return agent.status()["sources"]["links"]["health"]


def test_netlink_blocking_before_the_first_dump_does_not_hold_the_first_apply(node, release, monkeypatch):
    orig = AsyncIPRoute.bind

    async def stuck_bind(self, *a, **kw):
        release.wait()  # a synchronous wait: blocks the monitor's whole event loop, as a stuck recv would
        return await orig(self, *a, **kw)

    monkeypatch.setattr(AsyncIPRoute, "bind", stuck_bind)
    agent, kube, links, kernel = _agent(node)
    t0 = time.monotonic()
    agent.start()
    try:
        assert time.monotonic() - t0 < BOUND  # start() does not wait for the monitor either
        assert agent.wait_ready(BOUND), agent.status()["unready_reason"]
        assert not agent.status()["sources"]["links"]["in_sync"]
        took = _policy_change_is_enforced_in_bounded_time(agent, kube, kernel)
        assert took < BOUND
        wait_for(lambda: _links_health(agent)["state"] == "stalled", timeout=BOUND, what="stall reported")
        st = agent.status()["sources"]["links"]
        assert st["health"]["healthy"] is False and st["gates_sync"] is False
        assert agent.readiness()[0]  # links change no rule: the agent stays ready
        text = render(agent.status())  # what `policy-agent status` prints
        assert "links: NOT in sync (syncs: 0), not needed to apply, UNHEALTHY: stalled" in text
        # Once netlink answers, the monitor catches up by itself.
        netns.ip(node, "link", "add", "eniq1", "type", "veth", "peer", "name", "other1")
        release.set()
        wait_for(lambda: _links_health(agent)["state"] == "in_sync", timeout=BOUND, what="recovered")
        wait_for(lambda: agent.status()["counts"]["links"] == 1, timeout=BOUND, what="link seen")
    finally:
        release.set()
        agent.stop()


def test_netlink_receive_blocking_after_sync_does_not_hold_applies(node, release, monkeypatch):
    orig = AsyncIPRoute.get
    agent, kube, links, kernel = _agent(node)

    def stuck_get(self, *a, **kw):
        if links._state == "in_sync":  # the dump (which uses get() too) went through
            release.wait()  # then the monitor's receive blocks its thread
        return orig(self, *a, **kw)

    monkeypatch.setattr(AsyncIPRoute, "get", stuck_get)
    agent.start()
    try:
        assert agent.wait_ready(BOUND)
        wait_for(lambda: agent.status()["sources"]["links"]["in_sync"], timeout=BOUND, what="links dumped")
        netns.ip(node, "link", "add", "eniq2", "type", "veth", "peer", "name", "other2")
        assert _policy_change_is_enforced_in_bounded_time(agent, kube, kernel) < BOUND
        wait_for(lambda: _links_health(agent)["state"] == "stalled", timeout=BOUND, what="stall reported")
        assert agent.status()["counts"]["links"] == 0  # the stuck monitor did not see eniq2
        kube.upsert("Pod", ("x", "b"), make_pod("x", "b", ["10.233.0.11"]))
        wait_for(lambda: agent.applied_generation == agent.observed_generation
                 and "10.233.0.11" in kernel.ipset_save(), timeout=BOUND, what="second change enforced")
        release.set()
        wait_for(lambda: agent.status()["counts"]["links"] == 1, timeout=BOUND, what="link seen after release")
        assert _links_health(agent)["healthy"] is True
    finally:
        release.set()
        agent.stop()


class _Escaped(BaseException):
    """A bug that gets past the monitor's own error handling."""


def test_a_dead_monitor_thread_is_reported_and_applies_go_on(node, monkeypatch):
    def boom(self, msg):
        raise _Escaped("handler bug")

    monkeypatch.setattr(LinkSource, "_handle", boom)
    agent, kube, links, kernel = _agent(node)
    agent.start()
    try:
        assert agent.wait_ready(BOUND)
        wait_for(lambda: agent.status()["sources"]["links"]["in_sync"], timeout=BOUND, what="links dumped")
        netns.ip(node, "link", "add", "eniq3", "type", "veth", "peer", "name", "other3")  # -> _handle -> dies
        wait_for(lambda: _links_health(agent)["state"] == "dead", timeout=BOUND, what="death reported")
        assert "_Escaped: handler bug" in _links_health(agent)["detail"]
        wait_for(lambda: any("handler bug" in e["message"] for e in agent.status()["errors"]["recent"]),
                 timeout=BOUND, what="error in /status")
        assert _policy_change_is_enforced_in_bounded_time(agent, kube, kernel) < BOUND
    finally:
        agent.stop()
