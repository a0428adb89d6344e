"""End to end with the real compiler: NetworkPolicy objects -> compile -> apply -> traffic."""

from __future__ import annotations

import ipaddress

import pytest

from policy_agent.compiler import compile as compile_policies
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.model.types import (
    ClusterSnapshot,
    LabelSelector,
    Labels,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    PolicyType,
    Protocol,
    Rule,
)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
NODE = "node-1"


def snapshot(lab, *policies: NetworkPolicy) -> ClusterSnapshot:
    pods = [
        Pod("x", n, Labels({"app": n}), NODE, tuple(ipaddress.ip_address(i) for i in lab.ips[n]), phase="Running")
        for n in sorted(lab.pods)
    ]
    return ClusterSnapshot.of([*pods, *policies])


def allow_b_to_a(port: int) -> NetworkPolicy:
    return NetworkPolicy(
        "x", "allow-b", LabelSelector(Labels({"app": "a"})), (PolicyType.INGRESS,),
        ingress=(Rule((PolicyPort(Protocol.TCP, port),), (Peer(pod_selector=LabelSelector(Labels({"app": "b"}))),)),),
    )


def test_compiled_policy_enforced_updated_and_removed(lab):
    cfg = NodeConfig(node_name=NODE)
    dp = Dataplane(netns=lab.node, backend=lab.backend)
    foreign = lab.foreign()
    dp.apply(compile_policies(snapshot(lab), cfg), allow_sweep=True)
    assert lab.can("c", "a", 81) and lab.can("a", "b", 80)

    dp.apply(compile_policies(snapshot(lab, allow_b_to_a(80)), cfg))
    assert lab.can("b", "a", 80) and lab.can("b", "a", 80, family=6)
    assert not lab.can("b", "a", 81, timeout=0.5)
    assert not lab.can("c", "a", 80, timeout=0.5)
    assert not lab.can("b", "a", 80, "UDP", timeout=0.5)
    assert lab.can("a", "c", 81)

    r = dp.apply(compile_policies(snapshot(lab, allow_b_to_a(81)), cfg))
    assert r.changed
    assert lab.can("b", "a", 81) and not lab.can("b", "a", 80, timeout=0.5)

    dp.apply(compile_policies(snapshot(lab), cfg), allow_sweep=True)
    assert lab.can("c", "a", 80) and lab.can("b", "a", 80)
    assert "pa-pi-" not in lab.save(4)
    assert lab.foreign() == foreign
    assert Dataplane(netns=lab.node, backend=lab.backend).apply(compile_policies(snapshot(lab), cfg)).lines_written == 0
