"""The compiled text is accepted by the real kernel tools, and enforces with real traffic.

Everything happens in private namespaces named pa-comp-<pid>-*; nothing touches
the root namespace. Addresses are in 10.233.0.0/16 and fd00:233::/64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_compiler_evaluator import make_ns, make_pod, make_policy, node_config, peer, port, rule, sel

from policy_agent.commands.render import load
from policy_agent.compiler import compile
from policy_agent.desired import render_ipset_restore, render_iptables_save
from policy_agent.lab import netns
from policy_agent.model.types import ClusterSnapshot
from policy_agent.shared.naming import veth_name

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]


def _apply(node_ns: str, state) -> None:
    # ipsets before the rules that reference them (dataplane doctrine 2)
    netns.run(node_ns, "ipset", "restore", input=render_ipset_restore(state))
    netns.run(node_ns, "iptables-restore", "--noflush", input=render_iptables_save(state, 4))
    netns.run(node_ns, "ip6tables-restore", "--noflush", input=render_iptables_save(state, 6))


@pytest.fixture
def namespaces():
    made: list[str] = []

    def make(role: str) -> str:
        name = netns.unique_name("comp", role)
        netns.create(name)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            netns.delete(name)


@pytest.mark.parametrize("example", ["default-deny", "egress-allowlist", "ports-dualstack"])
def test_rendered_examples_load_into_the_kernel(example, namespaces):
    node = namespaces("node")
    objs, _ = load([str(ROOT / "examples" / example)], keep_going=False)
    state = compile(ClusterSnapshot.of(objs), node_config(node_name="node-1"))
    _apply(node, state)
    saved = netns.run(node, "iptables-save", "-t", "filter").stdout
    for name in state.table(4):
        assert f":{name} " in saved
    assert "-A FORWARD" in saved and "pa-FORWARD" in saved
    sets = netns.run(node, "ipset", "list", "-n").stdout.split()
    assert set(sets) == set(state.ipsets)


def test_real_traffic_follows_the_policy(namespaces):
    node = namespaces("node")
    netns.enable_forwarding(node)
    netns.ip(node, "addr", "add", "10.233.250.1/32", "dev", "lo")  # the node's own address

    web = make_pod("web", ips=("10.233.0.10",), labels={"app": "web"}, ports=[(8080, "TCP", "http")])
    db = make_pod("db", ips=("10.233.0.11",), labels={"app": "db"})
    other = make_pod("other", ips=("10.233.0.12",), labels={"app": "other"})
    pods = {"web": web, "db": db, "other": other}
    pod_ns = {}
    for name, p in pods.items():
        pod_ns[name] = namespaces(name)
        netns.add_veth(node, pod_ns[name], veth_name("eni", p.namespace, p.name), [str(i) for i in p.ips])
    remote_ns = namespaces("remote")
    netns.add_peer_link(node, remote_ns, "peer0", ["10.233.9.1"])
    rogue_ns = namespaces("rogue")  # a pod interface the agent does not know
    netns.add_veth(node, rogue_ns, "eni00000000000", ["10.233.8.1"])

    policy = make_policy("web-from-db", pod_selector=sel({"app": "web"}),
                         ingress=[rule([peer(pods=sel({"app": "db"}))], [port("http")])])
    eg = make_policy("other-egress", pod_selector=sel({"app": "other"}), types=["Egress"],
                     egress=[rule([peer(cidr="10.233.9.0/24")])])
    state = compile(ClusterSnapshot.of([make_ns("default"), *pods.values(), policy, eg]), node_config())
    _apply(node, state)

    servers = [netns.start_server(pod_ns[n], tcp_ports=[8080, 8081]) for n in pods]
    servers.append(netns.start_server(remote_ns, tcp_ports=[8080]))
    servers.append(netns.start_server(rogue_ns, tcp_ports=[8080]))
    try:
        P = netns.Probe
        cases = {
            "db->web:8080": (P(pod_ns["db"], "10.233.0.10", 8080), True),
            "db->web:8081": (P(pod_ns["db"], "10.233.0.10", 8081), False),  # named port is 8080 only
            "other->web:8080": (P(pod_ns["other"], "10.233.0.10", 8080), False),
            "remote->web:8080": (P(remote_ns, "10.233.0.10", 8080), False),
            "remote->db:8081": (P(remote_ns, "10.233.0.11", 8081), True),  # db is not isolated
            "web->db:8081": (P(pod_ns["web"], "10.233.0.11", 8081), True),
            "other->remote": (P(pod_ns["other"], "10.233.9.1", 8080), True),  # egress ipBlock
            "other->db": (P(pod_ns["other"], "10.233.0.11", 8081), False),  # egress-isolated
            "node->web (probe)": (P(node, "10.233.0.10", 8081), True),
            "rogue->db": (P(rogue_ns, "10.233.0.11", 8081), False),  # unknown interface
            "db->rogue": (P(pod_ns["db"], "10.233.8.1", 8080), False),
        }
        got = netns.probe_many([netns.Probe(p.ns, p.ip, p.port, p.protocol, key) for key, (p, _) in cases.items()],
                               timeout=1.5, attempts=2)
        want = {k: v for k, (_, v) in cases.items()}
        assert got == want
    finally:
        for s in servers:
            netns.stop_server(s)


def test_anti_spoofing_with_real_packets(namespaces):
    node = namespaces("node")
    netns.enable_forwarding(node)
    a = make_pod("a", ips=("10.233.0.20",))
    b = make_pod("b", ips=("10.233.0.21",))
    ans, bns = namespaces("a"), namespaces("b")
    netns.add_veth(node, ans, veth_name("eni", "default", "a"), ["10.233.0.20"])
    netns.add_veth(node, bns, veth_name("eni", "default", "b"), ["10.233.0.21"])
    # a also holds an address that is not its own (as a privileged pod could)
    netns.ip(ans, "addr", "add", "10.233.0.99/32", "dev", "eth0")
    _apply(node, compile(ClusterSnapshot.of([make_ns("default"), a, b]), node_config()))
    server = netns.start_server(bns, tcp_ports=[8080])
    try:
        assert netns.probe_many([netns.Probe(ans, "10.233.0.21", 8080, key="ok")], timeout=1.5)["ok"]
        # the same connection from the foreign source address: dropped by anti-spoofing
        netns.ip(ans, "route", "replace", "10.233.0.21/32", "via", "169.254.1.1", "dev", "eth0",
                 "src", "10.233.0.99")
        assert not netns.probe_many([netns.Probe(ans, "10.233.0.21", 8080, key="spoof")], timeout=1.5)["spoof"]
        assert _antispoof_packets(node) > 0  # dropped by the anti-spoofing rule of pa-FORWARD
    finally:
        netns.stop_server(server)


def _udp(ns: str, bind: tuple[str, int]):
    import socket

    with netns.in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the address may be added after the bind
    s.bind(bind)
    return s


def _received(sock, timeout: float) -> list[bytes]:
    """Every datagram that arrives within ``timeout``."""
    import socket
    import time

    out, end = [], time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recvfrom(2048)[0])
        except socket.timeout:
            break
    return out


def _three_pods(namespaces, policies=()):
    node = namespaces("node")
    netns.enable_forwarding(node)
    pods = {n: make_pod(n, ips=(f"10.233.0.{30 + i}",), labels={"app": n}) for i, n in enumerate("abc")}
    pns = {}
    for n, p in pods.items():
        pns[n] = namespaces(n)
        netns.add_veth(node, pns[n], veth_name("eni", "default", n), [str(p.ips[0])])
    _apply(node, compile(ClusterSnapshot.of([make_ns("default"), *pods.values(), *policies]), node_config()))
    return node, pns


def _antispoof_packets(node: str) -> int:
    out = netns.run(node, "iptables", "-L", "pa-FORWARD", "-v", "-n", "-x").stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "anti-spoofing" in line)


def _established_from_pod_packets(node: str) -> int:
    out = netns.run(node, "iptables", "-L", "pa-FORWARD", "-v", "-n", "-x").stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "flow from a local pod address" in line)


def test_established_flow_from_a_pod_costs_one_rule_and_forgery_none_of_it(namespaces):
    """Every packet of an established flow between two local pods is accepted by the
    first rule of pa-FORWARD (the conntrack accept that checks the pod's own address
    and interface); a forged datagram carrying that flow's tuple from a third pod is
    not, and is dropped by anti-spoofing (the next rule)."""
    node, pns = _three_pods(namespaces)
    netns.ip(pns["a"], "addr", "add", "10.233.0.31/32", "dev", "eth0")
    c = _udp(pns["c"], ("10.233.0.32", 7777))
    b = _udp(pns["b"], ("10.233.0.31", 5555))
    a = _udp(pns["a"], ("10.233.0.31", 5555))
    try:
        for attempt in range(5):
            b.sendto(b"hello %d" % attempt, ("10.233.0.32", 7777))
            if _received(c, 1.0):
                break
        c.sendto(b"reply", ("10.233.0.31", 5555))
        assert b"reply" in _received(b, 2.0)
        out = netns.run(node, "iptables", "-L", "pa-FORWARD", "-v", "-n", "-x").stdout
        first = next(line for line in out.splitlines() if line.split() and line.split()[0].isdigit())
        assert "flow from a local pod address" in first  # the fast path is rule 1
        est, spoof = _established_from_pod_packets(node), _antispoof_packets(node)
        for i in range(5):
            b.sendto(b"genuine %d" % i, ("10.233.0.32", 7777))
        assert len(_received(c, 2.0)) == 5
        assert _established_from_pod_packets(node) == est + 5 and _antispoof_packets(node) == spoof
        a.sendto(b"forged", ("10.233.0.32", 7777))
        assert b"forged" not in _received(c, 1.5)
        assert _established_from_pod_packets(node) == est + 5 and _antispoof_packets(node) == spoof + 1
    finally:
        for s in (a, b, c):
            s.close()


def test_pod_cannot_connect_with_another_local_pods_address(namespaces):
    """a holds b's address as a secondary one (as a privileged pod could) and uses it to
    connect to c: dropped before any policy, even though nobody is isolated."""
    import socket

    node, pns = _three_pods(namespaces)
    netns.ip(pns["a"], "addr", "add", "10.233.0.31/32", "dev", "eth0")
    server = netns.start_server(pns["c"], tcp_ports=[8080])
    try:
        assert netns.probe_many([netns.Probe(pns["a"], "10.233.0.32", 8080, key="own")], timeout=1.5)["own"]
        got = None
        for _ in range(2):
            with netns.in_netns(pns["a"]):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("10.233.0.31", 0))
                s.settimeout(1.5)
                s.connect(("10.233.0.32", 8080))
                got = True
            except OSError:
                got = False
            finally:
                s.close()
        assert got is False
        assert _antispoof_packets(node) > 0
    finally:
        netns.stop_server(server)


def test_forged_packet_of_an_established_udp_flow_is_not_delivered(namespaces):
    """b <-> c is an established UDP flow; a (egress: deny all) sends a datagram with the
    flow's exact tuple (b's address and port). The conntrack accept at the top of
    pa-FORWARD would take it; anti-spoofing, ahead of it, drops it. Control: without
    the anti-spoofing rule the same datagram is delivered, so the forged packet really
    is part of the established flow (a's egress policy would drop a new one)."""
    deny_a = make_policy("a-no-egress", pod_selector=sel({"app": "a"}), egress=[], types=["Egress"])
    node, pns = _three_pods(namespaces, [deny_a])
    netns.ip(pns["a"], "addr", "add", "10.233.0.31/32", "dev", "eth0")
    c = _udp(pns["c"], ("10.233.0.32", 7777))
    b = _udp(pns["b"], ("10.233.0.31", 5555))
    a = _udp(pns["a"], ("10.233.0.31", 5555))
    try:
        for attempt in range(5):  # the first datagrams may wait for neighbour resolution
            b.sendto(b"hello %d" % attempt, ("10.233.0.32", 7777))
            if _received(c, 1.0):
                break
        c.sendto(b"reply", ("10.233.0.31", 5555))
        assert b"reply" in _received(b, 2.0)  # the flow is now ESTABLISHED in the node
        before = _antispoof_packets(node)
        a.sendto(b"forged", ("10.233.0.32", 7777))
        assert b"forged" not in _received(c, 1.5)
        assert _antispoof_packets(node) > before
        b.sendto(b"genuine", ("10.233.0.32", 7777))
        assert b"genuine" in _received(c, 2.0)  # the real flow is untouched
        # The established accept that a's forged datagram reached first needs the
        # (source, interface) pair in the endpoints set, so it passed over it: its
        # counter did not move for the forgery.
        assert _established_from_pod_packets(node) > 0
        # control: remove the anti-spoofing drop from pa-FORWARD and forge again: the
        # "-o eni+" established accept now takes it (it is part of b <-> c's flow)
        out = netns.run(node, "iptables", "-L", "pa-FORWARD", "--line-numbers", "-n").stdout
        num = next(line.split()[0] for line in out.splitlines() if "anti-spoofing" in line)
        netns.run(node, "iptables", "-D", "pa-FORWARD", num)
        a.sendto(b"forged again", ("10.233.0.32", 7777))
        assert b"forged again" in _received(c, 2.0)
    finally:
        for s in (a, b, c):
            s.close()
