"""Pod -> own node (INPUT): endpoint_to_host_action RETURN | ACCEPT | DROP, on compiled state.

The kernel proof (host INPUT rules after ours see the traffic) is
tests/kernel/test_host_traffic.py; here the compiled chains and explain's wording.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from policy_agent.compiler import compile as compile_state
from policy_agent.compiler.options import NodeConfig
from policy_agent.desired import FILTER, Chain
from policy_agent.explain import HookPath, Packet, explain, explain_flow
from policy_agent.model.types import (
    ClusterSnapshot,
    IPBlock,
    LabelSelector,
    Labels,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    Rule,
)
from policy_agent.shared import naming

NODE = "n1"
NODE_IP = "10.233.255.1"


def _snapshot(*policies: NetworkPolicy) -> ClusterSnapshot:
    pods = [
        Pod("x", "open", Labels({"app": "open"}), NODE, (ipaddress.ip_address("10.233.0.1"),)),
        Pod("x", "shut", Labels({"app": "shut"}), NODE, (ipaddress.ip_address("10.233.0.2"),)),
    ]
    return ClusterSnapshot.of([*pods, *policies])


def _deny_egress_of_shut() -> NetworkPolicy:
    # egress of x/shut only to 192.0.2.0/24: the node is not in it
    return NetworkPolicy(
        "x", "shut-egress", LabelSelector(Labels({"app": "shut"})), (PolicyType.EGRESS,),
        egress=(Rule((), (Peer(ip_block=IPBlock(ipaddress.ip_network("192.0.2.0/24"))),)),),
    )


def _flow(action: str, pod: str, ctstate: str = "NEW"):
    node = NodeConfig(NODE, endpoint_to_host_action=action)
    snap = _snapshot(_deny_egress_of_shut())
    if ctstate == "NEW":
        return explain_flow(snap, node, f"x/{pod}", "node", "TCP", 10250, node_ips=[NODE_IP])
    state = compile_state(snap, node)
    ep = next(e for e in state.endpoints if e.pod == pod)
    return explain(state, Packet(4, ep.ips[0], NODE_IP, "tcp", 10250, ctstate), HookPath("INPUT", ep.interface),
                   [NODE_IP])


def test_default_is_return():
    assert NodeConfig(NODE).endpoint_to_host_action == "RETURN"
    with pytest.raises(ValueError, match="endpoint_to_host_action must be one of RETURN, ACCEPT, DROP"):
        NodeConfig(NODE, endpoint_to_host_action="REJECT")


def test_allowed_pod_to_node_returns_to_the_host_rules_without_our_marks():
    node = NodeConfig(NODE)
    e = _flow("RETURN", "open")
    assert e.decided_by is None and e.allowed
    assert "returned to the host's own rules" in e.summary()
    # our verdict bits never leave our chains: a host rule matching marks sees none of ours
    ours = node.accept_mark | node.scratch_mark
    assert e.trace[-1].action == "RETURN" and e.trace[-1].mark & ours == 0
    assert any(s.mark & node.accept_mark for s in e.trace)  # it was set by the egress verdict


def test_established_pod_to_node_returns_too():
    e = _flow("RETURN", "open", ctstate="ESTABLISHED")
    assert e.decided_by is None and e.trace[-1].comment.startswith("established or related flow")
    # even for a pod whose egress policy would deny a new flow: replies to node-opened
    # flows (kubelet probes) go to the host's rules, not through policy
    e = _flow("RETURN", "shut", ctstate="ESTABLISHED")
    assert e.decided_by is None


@pytest.mark.parametrize("action", ["RETURN", "ACCEPT", "DROP"])
def test_egress_denied_pod_to_node_is_dropped_by_us_in_every_mode(action):
    e = _flow(action, "shut")
    assert e.verdict == "DROP" and e.decided_by is not None
    assert e.decided_by.chain.startswith("pa-fw-") and "no egress policy allowed" in e.decided_by.comment
    assert "returned to the host" not in e.summary()


def test_accept_and_drop_modes():
    e = _flow("ACCEPT", "open")
    assert e.verdict == "ACCEPT" and e.decided_by.chain == naming.CHAIN_WL_TO_HOST
    assert e.decided_by.comment.startswith("endpoint_to_host_action ACCEPT")
    assert e.decided_by.mark == 0  # cleared before the accept as well
    assert _flow("ACCEPT", "open", ctstate="ESTABLISHED").verdict == "ACCEPT"
    e = _flow("DROP", "open")
    assert e.verdict == "DROP" and e.decided_by.comment.startswith("endpoint_to_host_action DROP")
    # DROP mode still lets replies of node-opened flows back (kubelet probes)
    assert _flow("DROP", "open", ctstate="ESTABLISHED").verdict == "ACCEPT"


def test_egress_guard_drops_a_packet_that_returns_without_the_accept_bit():
    # Defence in depth for RETURN: if an endpoint chain ever returned without a
    # verdict, the packet must not be handed to the host's (possibly accepting) rules.
    state = compile_state(_snapshot(), NodeConfig(NODE))
    ep = state.endpoints[0]
    fw = naming.from_workload_chain(ep.interface)
    chains = dict(state.table(4, FILTER))
    chains[fw] = Chain(fw, ())  # an endpoint chain that just returns
    state = dataclasses.replace(state, chains={**state.chains, (4, FILTER): chains})
    e = explain(state, Packet(4, ep.ips[0], NODE_IP, "tcp", 22), HookPath("INPUT", ep.interface), [NODE_IP])
    assert e.verdict == "DROP" and e.decided_by.comment == "egress policy did not accept the packet"
