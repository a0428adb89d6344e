"""ClusterNetworkPolicy end to end: real kube-apiserver with our CRD, the whole agent
(store, incremental compiler, dataplane) against the real kernel in private network
namespaces, real TCP probes. Each step is an API write; the probes show the verdict.

Pods a, b, c (one namespace, on this node), and a "node" peer: a host address that a
Node object in the API reports as its InternalIP.
"""

from __future__ import annotations

import os
import uuid

import pytest
from cnp_helpers import cnp, crd_installed, install_crd, kubectl_apply
from kube_helpers import apply, namespace_yaml, pod_yaml, set_pod_ips, wait_for

pytestmark = [pytest.mark.apiserver, pytest.mark.kernel, pytest.mark.timeout(1200)]

IPS = {"a": "10.233.95.2", "b": "10.233.95.3", "c": "10.233.95.4"}
NODE_PEER_IP = "10.233.95.100"
PORT = 8080
NODE_NAME = "cnp-n1"


class _KubeAdapter:
    """The agent's source shape around a KubeSource (as commands/run.py builds it)."""

    name = "kube"

    def __init__(self, api) -> None:
        self.api = api
        self.src = None

    def start(self, sink) -> None:
        from policy_agent.sources.kube import KubeSource

        self.src = KubeSource(sink, self.api, source=self.name).start()

    def stop(self) -> None:
        if self.src is not None:
            self.src.stop()


def test_kernel_cnp_create_update_delete_enforced(cluster, tmp_path):
    from kubernetes import client

    from policy_agent.agent import Agent
    from policy_agent.compiler.options import NodeConfig
    from policy_agent.dataplane.apply import Dataplane
    from policy_agent.lab import netns
    from policy_agent.shared.naming import veth_name
    from policy_agent.sources.cni import CniSource

    if not crd_installed(cluster):
        install_crd(cluster)
    tag = uuid.uuid4().hex[:6]
    ns = f"pa-cnp-{os.getpid()}-{tag}"
    node_obj = f"pa-cnp-peer-{os.getpid()}-{tag}"
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    apply(cluster, namespace_yaml(ns, {"pa-cnp": tag}), *[pod_yaml(ns, p, {"app": p}, node=NODE_NAME) for p in IPS])
    for p, ip in IPS.items():
        set_pod_ips(api, ns, p, ip)
    core.create_node({"metadata": {"name": node_obj, "labels": {"pa-cnp-peer": tag}}})
    core.patch_node_status(node_obj, {"status": {"addresses": [{"type": "InternalIP", "address": NODE_PEER_IP}]}})

    names = [f"cnp-{tag}-{x}" for x in ("admin", "baseline", "nodes")]
    node = netns.unique_name("i14b", "cnode")
    pod_ns = {p: netns.unique_name("i14b", f"c{p}") for p in IPS}
    peer = netns.unique_name("i14b", "cpeer")
    servers: list = []
    agent = None

    def pods(app: str) -> dict:
        return {"pods": {"namespaceSelector": {"matchLabels": {"pa-cnp": tag}}, "podSelector": {"matchLabels": {"app": app}}}}

    try:
        netns.create(node)
        netns.enable_forwarding(node)
        for p, pns in pod_ns.items():
            netns.create(pns)
            netns.add_veth(node, pns, veth_name("eni", ns, p), [IPS[p]])
        netns.create(peer)
        netns.add_peer_link(node, peer, f"pcn{os.getpid() % 1000000}", [NODE_PEER_IP])
        servers = [netns.start_server(pod_ns[p], tcp_ports=[PORT]) for p in ("b", "c")]
        servers.append(netns.start_server(peer, tcp_ports=[PORT]))

        def reach(src: str, dst: str) -> bool:
            ip = NODE_PEER_IP if dst == "node" else IPS[dst]
            return netns.probe(pod_ns[src], ip, PORT, "TCP", timeout=1.0)

        def expect(**want: bool) -> None:
            """expect(a_b=False, c_b=True): each src_dst pair reaches (True) or not."""
            for pair, ok in want.items():
                src, dst = pair.split("_")
                wait_for(lambda s=src, d=dst, o=ok: reach(s, d) == o, 60, f"{src}->{dst} {'allowed' if ok else 'denied'}")

        agent = Agent(NodeConfig(NODE_NAME), Dataplane(netns=node),
                      [_KubeAdapter(api), CniSource(str(tmp_path / "ep"))], min_interval=0.02, refresh_interval=5)
        agent.start()
        assert agent.wait_ready(90), agent.status()
        expect(a_b=True, c_b=True, a_node=True, b_node=True)

        # Admin Deny from a to b: a denied, c untouched.
        admin = cnp(names[0], "Admin", 10, pods("b"), ingress=[{"name": "deny-a", "action": "Deny", "from": [pods("a")]}])
        kubectl_apply(cluster, admin)
        expect(a_b=False, c_b=True)
        wait_for(lambda: agent.status()["counts"]["cluster_policies"] >= 1, 30, "policy counted in status")

        # A NetworkPolicy isolating b with no allow; the Admin rule becomes Accept: a is
        # allowed over the NetworkPolicy, c is denied by it.
        apply(cluster, '{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", '
                       f'"metadata": {{"namespace": "{ns}", "name": "isolate-b"}}, '
                       '"spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}}')
        admin["spec"]["ingress"][0]["action"] = "Accept"
        kubectl_apply(cluster, admin)
        expect(a_b=True, c_b=False)

        # Pass: the NetworkPolicy decides, a denied too.
        admin["spec"]["ingress"][0]["action"] = "Pass"
        kubectl_apply(cluster, admin)
        expect(a_b=False, c_b=False)

        # Without the NetworkPolicy, Pass falls through to the Baseline tier, which denies c only.
        cluster.kubectl("delete", "networkpolicy", "-n", ns, "isolate-b")
        kubectl_apply(cluster, cnp(names[1], "Baseline", 50, pods("b"),
                                   ingress=[{"action": "Deny", "from": [pods("c")]}]))
        expect(a_b=True, c_b=False)

        # Egress to the nodes' addresses (a Node object's InternalIP): a denied, b not.
        kubectl_apply(cluster, cnp(names[2], "Admin", 20, pods("a"), egress=[{
            "action": "Deny", "to": [{"nodes": {"matchLabels": {"pa-cnp-peer": tag}}}],
            "protocols": [{"tcp": {"destinationPort": {"number": PORT}}}]}]))
        expect(a_node=False, b_node=True)
        # The node loses the label: the peer no longer matches.
        core.patch_node(node_obj, {"metadata": {"labels": {"pa-cnp-peer": None}}})
        expect(a_node=True)

        # Delete them all: everything reachable again.
        cluster.kubectl("delete", "clusternetworkpolicy", *names)
        expect(a_b=True, c_b=True, a_node=True)
        # The three deletes are three watch events; the last one (a policy that no longer
        # matches anything) changes no verdict, so the probes above do not wait for it.
        wait_for(lambda: agent.status()["counts"]["cluster_policies"] == 0, 30, "every policy uncounted")
    finally:
        # Kernel state first: an API server that died must not leave namespaces behind.
        if agent is not None:
            agent.stop()
        for s in servers:
            netns.stop_server(s)
        for n in [*pod_ns.values(), peer, node]:
            netns.delete(n)
        cluster.kubectl("delete", "clusternetworkpolicy", "--ignore-not-found", *names, check=False)
        try:
            core.delete_node(node_obj)
        except Exception:  # noqa: BLE001 - best effort: already gone, or the server is down
            pass
