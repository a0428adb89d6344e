"""NetworkPolicy on the pod behind a ClusterIP, after kube-proxy's DNAT in the client's node.

The Service listens on 8080/8081 and targets the pod's 80; the policy speaks of port 80 and
of pods, so a verdict through the Service is only right if it is taken on the translated
packet. Clients on both nodes (same-node and cross-node paths), TCP and UDP.
"""

from __future__ import annotations

import time

import cluster_helpers as H
import pytest

pytestmark = [pytest.mark.cluster]

NS = "cl-svc"
SVC_TCP, SVC_UDP = 8080, 8081
TIMEOUT = 45


@pytest.fixture(scope="module")
def env(cluster):
    H.fresh_namespace(cluster, NS, {"name": NS})
    deps = [H.deployment(NS, "server", {"app": "server"}, node=cluster.nodes[0].name)]
    for node in cluster.nodes:
        for role in ("allowed", "denied"):
            deps.append(H.deployment(NS, f"{role}-{node.name}", {"role": role, "client": f"{role}-{node.name}"},
                                     node=node.name))
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": NS, "name": "server"},
           "spec": {"type": "ClusterIP", "selector": {"app": "server"},
                    "ports": [{"name": "tcp", "port": SVC_TCP, "targetPort": 80, "protocol": "TCP"},
                              {"name": "udp", "port": SVC_UDP, "targetPort": 80, "protocol": "UDP"}]}}
    cluster.apply([*deps, svc])
    pods = H.wait_deployments(cluster, deps)
    server = pods[(NS, "server")]
    H.wait_for("the server's endpoint", lambda: [a["ip"] for s in cluster.get("endpoints", "-n", NS, "server")
                                                  .get("subsets", []) for a in s.get("addresses", [])]
               == [server.ip], 60)
    cluster_ip = cluster.get("svc", "-n", NS, "server")["spec"]["clusterIP"]
    clients = {name: p for (_ns, name), p in pods.items() if name != "server"}
    yield cluster, server, cluster_ip, clients
    cluster.kubectl("delete", "namespace", "--wait=false", NS, check=False)


def _targets(server_ip: str, cluster_ip: str) -> list[H.Target]:
    return [H.Target(cluster_ip, SVC_TCP, "TCP"), H.Target(cluster_ip, SVC_UDP, "UDP"),
            H.Target(server_ip, 80, "TCP"), H.Target(server_ip, 80, "UDP")]


def _converge(cluster, clients, targets, want: dict[str, bool]) -> dict:
    """Probe from every client until each gets ``want[client]`` on every target, or fail with the last matrix."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        got = H.probe_rows(cluster, {n: (p, targets) for n, p in clients.items()})
        wrong = {n: [(t.host, t.port, t.proto, ok, err) for t, (ok, err) in zip(targets, got[n]) if ok != want[n]]
                 for n in clients}
        wrong = {n: w for n, w in wrong.items() if w}
        if not wrong:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"after {TIMEOUT}s, wrong verdicts (host, port, proto, connected, error): {wrong}",
                        pytrace=False)
        time.sleep(1)


def test_policy_applies_behind_a_cluster_ip(env):
    cluster, server, cluster_ip, clients = env
    targets = _targets(server.ip, cluster_ip)
    # Without a policy every client gets through the Service (kube-proxy works on both nodes).
    _converge(cluster, clients, targets, {n: True for n in clients})
    policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": NS, "name": "server-from-allowed"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "allowed"}}}],
                              "ports": [{"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}]}]}}
    cluster.apply([policy])
    want = {n: n.startswith("allowed-") for n in clients}
    _converge(cluster, clients, targets, want)
    # Stable, not a moment's state: a second full round gives the same verdicts.
    _converge(cluster, clients, targets, want)


def test_egress_policy_sees_the_translated_destination(env):
    cluster, server, cluster_ip, clients = env
    # The allowed clients may send only to the server pod's address, port 80. Through the
    # Service that is allowed only if egress is judged after DNAT (the packet leaves the
    # pod for 10.96.x.x:8080, which no rule allows).
    policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": NS, "name": "allowed-egress-to-server-only"},
        "spec": {"podSelector": {"matchLabels": {"role": "allowed"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": f"{server.ip}/32"}}],
                             "ports": [{"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}]}]}}
    allowed = {n: p for n, p in clients.items() if n.startswith("allowed-")}
    denied_ips = [p.ip for n, p in clients.items() if n.startswith("denied-")]
    others = [H.Target(ip, 80, proto) for ip in denied_ips for proto in ("TCP", "UDP")]
    _converge(cluster, allowed, others, {n: True for n in allowed})  # before: open
    cluster.apply([policy])
    # Through the Service and directly: still allowed (egress and the server's ingress agree).
    _converge(cluster, allowed, _targets(server.ip, cluster_ip), {n: True for n in allowed})
    # Anything else is now blocked by the egress policy (the denied clients serve 80 too).
    _converge(cluster, allowed, others, {n: False for n in allowed})
    cluster.delete([policy])
