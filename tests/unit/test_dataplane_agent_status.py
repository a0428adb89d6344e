"""The agent shows what the dataplane set aside: /status, the gauge, readiness stays up."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import replace

from policy_agent.agent import Agent, PushSource, default_compiler_factory
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.model.types import LabelSelector, Labels, Namespace, NetworkPolicy, Peer, Pod, PolicyType, Rule

POISON = "0.0.0.0/0"


class Poisoning:
    """The real incremental compiler, with a member the kernel refuses added to one peer
    set while ``poison`` is on (edge validation keeps such members out of the model)."""

    poison = True  # class-wide: the agent may build a new compiler at any time

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def desired(self):
        d = self.inner.desired()
        if not self.poison:
            return d
        name = min(n for n in d.ipsets if n.startswith("pa4s-"))
        s = d.ipsets[name]
        return replace(d, ipsets={**d.ipsets, name: replace(s, members=s.members | {POISON})})


def test_set_aside_shows_in_status_and_metrics_while_ready():
    def pod(ns, name, ip):
        return Pod(ns, name, Labels({"app": name}), "n1", (ipaddress.ip_address(ip),), phase="Running")

    allow = NetworkPolicy("x", "allow-b", LabelSelector(Labels({"app": "a"})), (PolicyType.INGRESS,),
                          (Rule((), (Peer(pod_selector=LabelSelector(Labels({"app": "b"}))),)),))
    deny = NetworkPolicy("y", "deny-all", LabelSelector(), (PolicyType.INGRESS,), ())
    src = PushSource("kube", {
        "Namespace": {n: Namespace(n) for n in ("x", "y")},
        "Pod": {("x", "a"): pod("x", "a", "10.233.0.1"), ("x", "b"): pod("x", "b", "10.233.0.2"),
                ("y", "c"): pod("y", "c", "10.233.0.3")},
        "NetworkPolicy": {("x", "allow-b"): allow, ("y", "deny-all"): deny},
    })
    compilers: list[Poisoning] = []

    def factory(node):
        compilers.append(Poisoning(default_compiler_factory(node)))
        return compilers[-1]

    kernel = FakeKernel()
    agent = Agent(NodeConfig("n1"), Dataplane(kernel=kernel), [src], min_interval=0.0, refresh_interval=0,
                  gc_freeze=False, compiler_factory=factory)
    agent.start()
    try:
        assert agent.wait_ready(30)
        st = agent.status()
        assert st["healthy"] and st["degraded"]
        assert [(x["kind"], x["member"]) for x in st["set_aside"]] == [("member", POISON)]
        assert "pa-pi-y.deny-all" in kernel.iptables_save(4)  # everything else is enforced
        text = agent.metrics.render().decode()
        assert 'policy_agent_dataplane_set_aside_objects{kind="member"} 1.0' in text
        assert 'policy_agent_dataplane_set_aside_objects{kind="chain"} 0.0' in text
        # the input is fixed: the next apply heals it and the status clears
        Poisoning.poison = False
        src.upsert("Pod", ("y", "d"), pod("y", "d", "10.233.0.4"))  # any change: the next apply
        deadline = time.monotonic() + 20
        while agent.status()["set_aside"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.status()["set_aside"] == [] and not agent.status()["degraded"]
        assert 'policy_agent_dataplane_set_aside_objects{kind="member"} 0.0' in agent.metrics.render().decode()
    finally:
        agent.stop()
        Poisoning.poison = True
