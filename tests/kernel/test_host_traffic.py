"""Pod -> own node through real INPUT chains: the host's own rules after ours still decide.

A node netns (its address: the pods' gateway 169.254.1.1, fd00:233::71:fe on its
lo) runs a TCP/UDP server; two pod netns behind eni veths. Host INPUT
rules are placed after our jump (as a host firewall or kube-proxy's
KUBE-FIREWALL would be). With endpoint_to_host_action RETURN (the default) they
see what egress policy allowed, new and established; with ACCEPT (the old
behaviour, kept as an option) they do not, which is what makes this test able to fail.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import pytest
from helpers.desired_fixtures import pod
from helpers.kernel_lab import backends, can, node_with_pods

from policy_agent.compiler import compile as compile_state
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.kernel import binary
from policy_agent.lab import netns
from policy_agent.model.types import (
    ClusterSnapshot,
    IPBlock,
    LabelSelector,
    Labels,
    NetworkPolicy,
    Peer,
    PolicyPort,
    PolicyType,
    Protocol,
    Rule,
)
from policy_agent.shared.naming import from_workload_chain, veth_name

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NODE = "n1"
NODE_V4 = netns.GATEWAY_V4  # the node's address as the pods reach it
NODE_V6 = "fd00:233::71:fe"
PODS = {"open": ("10.233.71.1", "fd00:233::71:1"), "shut": ("10.233.71.2", "fd00:233::71:2")}
KUBELET, OTHER, DNS = 10250, 10255, 5353
HOST_RULES = """*filter
-A INPUT -p tcp --dport {kubelet} -m comment --comment "host firewall" -j DROP
-A INPUT -m mark ! --mark 0x0/0xffff0000 -m comment --comment "host sees a policy mark" -j DROP
COMMIT
"""
HOST_DROP_ESTABLISHED_DNS = """*filter
-A INPUT -p udp --dport {dns} -m conntrack --ctstate ESTABLISHED -m comment --comment "host firewall" -j DROP
COMMIT
"""


def _node_addresses(node: str) -> None:
    # the node's own addresses (this kernel has no dummy links; lo serves as well)
    netns.ip(node, "-4", "addr", "add", f"{NODE_V4}/32", "dev", "lo")
    netns.ip(node, "-6", "addr", "add", f"{NODE_V6}/128", "dev", "lo", "nodad")


@pytest.fixture(params=backends())
def node_lab(request):
    pods = {p: netns.unique_name("h4hi", p) for p in PODS}
    with node_with_pods(netns.unique_name("h4hi", "node"), pods, PODS, lambda p: veth_name("eni", "x", p),
                        setup_node=_node_addresses) as (node, pods):
        server = netns.start_server(node, tcp_ports=(KUBELET, OTHER), udp_ports=(DNS,), name="node")
        try:
            yield request.param, node, pods
        finally:
            netns.stop_server(server)


def _snapshot() -> ClusterSnapshot:
    pods = [pod("x", p, *ips, node=NODE) for p, ips in PODS.items()]
    to_node = tuple(Peer(ip_block=IPBlock(ipaddress.ip_network(a))) for a in (f"{NODE_V4}/32", f"{NODE_V6}/128"))
    ports = (PolicyPort(Protocol.TCP, KUBELET), PolicyPort(Protocol.TCP, OTHER), PolicyPort(Protocol.UDP, DNS))
    # x/open may reach the node on the three ports; x/shut only 192.0.2.0/24 (not the node)
    open_egress = NetworkPolicy(
        "x", "open-to-node", LabelSelector(Labels({"app": "open"})), (PolicyType.EGRESS,),
        egress=(Rule(ports, to_node),),
    )
    shut_egress = NetworkPolicy(
        "x", "shut-egress", LabelSelector(Labels({"app": "shut"})), (PolicyType.EGRESS,),
        egress=(Rule((), (Peer(ip_block=IPBlock(ipaddress.ip_network("192.0.2.0/24"))),)),),
    )
    return ClusterSnapshot.of([*pods, open_egress, shut_egress])


def _restore(backend: str, node: str, text: str) -> None:
    for family in (4, 6):
        netns.run(node, binary(backend, family, "restore"), "--noflush", input=text)


def _can(pods: dict, src: str, ip: str, port: int) -> bool:
    return can(pods[src], ip, port)


def _counter(backend: str, node: str, chain: str, comment: str) -> int:
    text = netns.run(node, binary(backend, 4, "save"), "-c").stdout
    for line in text.splitlines():
        if f"-A {chain} " in line and comment in line:
            return int(re.match(r"\[(\d+):\d+\]", line).group(1))
    raise AssertionError(f"no rule {comment!r} in {chain}:\n{text}")


@pytest.mark.parametrize("action", ["RETURN", "ACCEPT"])
def test_host_input_rules_after_ours_see_pod_to_node_traffic(node_lab, action):
    backend, node, pods = node_lab
    _restore(backend, node, HOST_RULES.format(kubelet=KUBELET))
    Dataplane(netns=node, backend=backend).apply(
        compile_state(_snapshot(), NodeConfig(NODE, endpoint_to_host_action=action)), allow_sweep=True
    )
    inp = [ln for ln in netns.run(node, binary(backend, 4, "save")).stdout.splitlines() if ln.startswith("-A INPUT")]
    assert "-j pa-INPUT" in inp[0] and "host firewall" in inp[1], inp  # the host's rules come after our jump

    for ip in (NODE_V4, NODE_V6):
        # allowed by x/open's egress policy, accepted by the host (and no policy mark reached it)
        assert _can(pods, "open", ip, OTHER), ip
        # allowed by policy; the host's firewall after our jump decides: only RETURN lets it
        assert _can(pods, "open", ip, KUBELET) == (action == "ACCEPT"), ip
        # denied by x/shut's egress policy: dropped inside our chains, whatever the host says
        assert not _can(pods, "shut", ip, OTHER), ip
    shut_fw = from_workload_chain(veth_name("eni", "x", "shut"))
    assert _counter(backend, node, shut_fw, "no egress policy allowed the packet") > 0


def _udp_round_trip(sock: socket.socket, payload: bytes) -> bool:
    sock.send(payload)
    try:
        return payload in sock.recv(2048)
    except OSError:
        return False


@pytest.mark.parametrize("action", ["RETURN", "ACCEPT"])
def test_established_pod_to_node_flow_is_returned_to_the_host_rules(node_lab, action):
    backend, node, pods = node_lab
    Dataplane(netns=node, backend=backend).apply(
        compile_state(_snapshot(), NodeConfig(NODE, endpoint_to_host_action=action)), allow_sweep=True
    )
    with netns.in_netns(pods["open"]):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(1.0)
        sock.connect((NODE_V4, DNS))
        assert _udp_round_trip(sock, b"first")  # NEW, then ESTABLISHED once answered
        # the host starts dropping established DNS flows: only our RETURN lets it see them
        _restore(backend, node, HOST_DROP_ESTABLISHED_DNS.format(dns=DNS))
        assert _udp_round_trip(sock, b"second") == (action == "ACCEPT")
    finally:
        sock.close()
