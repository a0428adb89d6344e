"""Pods of the real cluster wired by `vpcip-cni`, executed by each node's containerd:
addresses from the node's pool, host veths named by the shared convention (seen in the
node's namespace), an address freed when its pod goes, and a force-deleted pod recreated
under the same name on the same node getting a working network.
"""

from __future__ import annotations

import time

import cluster_helpers as H
import pytest

from policy_agent.shared import naming

pytestmark = [pytest.mark.cluster]

NS = "cl-pods"


@pytest.fixture(scope="module")
def ns(cluster):
    H.fresh_namespace(cluster, NS)
    yield NS
    cluster.kubectl("delete", "namespace", "--wait=false", NS, check=False)


def _link(node: H.Node, name: str) -> str:
    return node.run("ip", "-o", "link", "show", "dev", name, check=False).stdout


def _allocations(node: H.Node, pod: H.Pod) -> list[dict]:
    return [a for a in node.ipam_state().get("allocations", [])
            if a.get("namespace") == pod.namespace and a.get("pod") == pod.name]


def _reach(cluster: H.Cluster, src: H.Pod, dst_ip: str, timeout: float = 30) -> None:
    """TCP and UDP from src to dst_ip answer (retried: a pod's rules may land just after Ready)."""
    targets = [H.Target(dst_ip, 80, "TCP"), H.Target(dst_ip, 80, "UDP")]
    H.wait_for(f"{src.ref} -> {dst_ip} TCP and UDP",
               lambda: all(ok for ok, _ in H.probe_row(cluster, src, targets)), timeout, interval=1)


def test_deployment_pods_get_pool_addresses_and_named_veths(cluster, ns):
    dep = H.deployment(ns, "web", {"app": "web"}, replicas=4, spread="cl-pods-web")
    cluster.apply([dep])
    pods = H.wait_for("4 web pods ready", lambda: (lambda ps: ps if len(ps) == 4 else None)(
        cluster.ready_pods(ns, "app=web")), 180, interval=1)
    assert {p.node for p in pods} == {n.name for n in cluster.nodes}, [(p.name, p.node) for p in pods]
    for pod in pods:
        node = cluster.node(pod.node)
        assert pod.ip in node.pool(), f"{pod.ref} got {pod.ip}, not from {node.name}'s pool"
        veth = naming.veth_name("eni", pod.namespace, pod.name)
        assert veth.startswith("eni") and len(veth) == 14
        assert "state UP" in _link(node, veth) or "LOWER_UP" in _link(node, veth), \
            f"{node.name}: no host veth {veth} for {pod.ref}: {node.run('ip', '-o', 'link').stdout}"
        route = node.run("ip", "-4", "route", "get", pod.ip).stdout
        assert f"dev {veth}" in route, f"{node.name}: route to {pod.ip} is not via {veth}: {route}"
        allocs = _allocations(node, pod)
        assert [(a["ipv4"], a["host_veth"]) for a in allocs] == [(pod.ip, veth)], allocs
    # Real traffic between them, across and within nodes.
    for src in pods[:2]:
        for dst in pods:
            if dst is not src:
                _reach(cluster, src, dst.ip)


def test_deleting_a_pod_frees_its_ip(cluster, ns):
    pods = cluster.ready_pods(ns, "app=web")
    assert pods, "the web Deployment of the previous test is gone"
    victim = pods[0]
    node = cluster.node(victim.node)
    veth = naming.veth_name("eni", victim.namespace, victim.name)
    assert _allocations(node, victim)
    cluster.kubectl("delete", "pod", "-n", ns, victim.name, "--wait=true", timeout=120)
    H.wait_for(f"{victim.ref}'s allocation released by vpcip-ipamd",
               lambda: not _allocations(node, victim), 60)
    st = node.ipam_state()
    assert victim.ip not in {a["ipv4"] for a in st["allocations"]}, st["allocations"]
    # Freed addresses cool down before re-use (as the AWS VPC CNI does), then go back to the pool.
    assert victim.ip in st.get("cooling", {}) or victim.ip in node.pool(), st.get("cooling")
    H.wait_for(f"{node.name}: host veth {veth} removed", lambda: _link(node, veth) == "", 30)


def test_force_deleted_pod_recreated_with_the_same_name_on_the_same_node_works(cluster, ns):
    node = cluster.nodes[0]
    peer = next(p for p in cluster.ready_pods(ns, "app=web") if p.node != node.name)
    spec = H.bare_pod(ns, "same", {"app": "same"}, node=node.name)
    cluster.apply([spec])
    first = H.wait_for("pod same ready", lambda: next(iter(cluster.ready_pods(ns, "app=same")), None), 120)
    uid1 = cluster.get("pod", "-n", ns, "same")["metadata"]["uid"]
    _reach(cluster, peer, first.ip)
    # Force deletion removes the API object at once; the kubelet tears the old sandbox down
    # while the new pod (same namespace and name, so the same veth name) is being set up.
    cluster.kubectl("delete", "pod", "-n", ns, "same", "--force", "--grace-period=0")
    t = time.monotonic()
    cluster.apply([spec])

    def second_ready():
        p = cluster.get("pod", "-n", ns, "same")
        return H.to_pod(p) if p["metadata"]["uid"] != uid1 and H.is_ready(p) else None

    second = H.wait_for("the recreated pod same ready", second_ready, 180)
    assert second.node == node.name
    assert second.ip in node.pool()
    _reach(cluster, peer, second.ip, timeout=60)  # in
    _reach(cluster, second, peer.ip, timeout=30)  # and out
    veth = naming.veth_name("eni", ns, "same")
    assert f"dev {veth}" in node.run("ip", "-4", "route", "get", second.ip).stdout
    # The old sandbox's DEL must not have taken the new one's address or veth: after it is
    # done there is exactly one allocation for ns/same, the new one.
    H.wait_for("one allocation for the recreated pod",
               lambda: [a["ipv4"] for a in _allocations(node, second)] == [second.ip], 90)
    _reach(cluster, peer, second.ip, timeout=10)
    print(f"recreated pod ready {time.monotonic() - t:.1f}s after the force delete "
          f"(first {first.ip}, second {second.ip})")
