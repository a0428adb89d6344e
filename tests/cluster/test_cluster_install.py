"""`kubectl apply -f manifests/ -f manifests/shim/` (what `cluster.sh up` runs, as docs/install.md
says) on the real cluster: both DaemonSets ready on every node, the CNI the init container
installed in each node's own /opt/cni/bin and /etc/cni/net.d, and the agent's in-cluster
client reaching the API server through the `kubernetes` Service (kube-proxy's DNAT).
"""

from __future__ import annotations

import hashlib
import json
import os

import cluster_helpers as H
import pytest

pytestmark = [pytest.mark.cluster]

KUBERNETES_SVC = "10.96.0.1"
API_SERVER = "10.240.0.2"


def test_both_daemonsets_ready_on_every_node(cluster):
    nodes = {n.name for n in cluster.nodes}
    assert len(nodes) >= 2
    for ds in H.DAEMONSETS:
        d = cluster.get("ds", "-n", H.AGENT_NS, ds)
        s = d["status"]
        assert (s["desiredNumberScheduled"], s["numberReady"], s.get("updatedNumberScheduled")) == \
            (len(nodes),) * 3, f"DaemonSet {ds}: {s}"
        pods = cluster.pods(H.AGENT_NS, f"app.kubernetes.io/name={ds}")
        ready_on = {p["spec"]["nodeName"] for p in pods if H.is_ready(p)}
        assert ready_on == nodes, f"{ds} ready on {sorted(ready_on)}, nodes {sorted(nodes)}"
        image = d["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image.startswith("registry.example.com/policy-agent:"), image


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dev_ino(node: H.Node, path: str) -> tuple[int, int]:
    dev, ino = node.run("stat", "-c", "%d %i", path).stdout.split()
    return int(dev), int(ino)


def test_init_container_installed_the_cni_in_each_node(cluster):
    cm = cluster.get("configmap", "-n", H.AGENT_NS, "vpcip-cni-config")
    want_conf = json.loads(cm["data"]["05-vpcip.conflist"])
    machine = {d: (os.stat(d).st_dev, os.stat(d).st_ino) for d in ("/opt/cni/bin", "/etc/cni/net.d")
               if os.path.isdir(d)}
    for node in cluster.nodes:
        for d in ("/opt/cni/bin", "/etc/cni/net.d"):
            # What the node (its containerd) sees is the node's own directory in its work area,
            # not the machine's: the DaemonSet's hostPath wrote there.
            seen = _dev_ino(node, d)
            own = os.stat(node.root / d.lstrip("/"))
            assert seen == (own.st_dev, own.st_ino), f"{node.name}: {d} is not the node's own directory"
            assert seen != machine.get(d), f"{node.name}: {d} is the machine's directory"
        exe = (node.root / "opt/cni/bin/vpcip-cni").read_bytes()
        assert exe.startswith(b"#!"), f"{node.name}: vpcip-cni is not an executable zip application"
        assert node.run("sha256sum", "/opt/cni/bin/vpcip-cni").stdout.split()[0] == _sha(exe)
        assert node.run("test", "-x", "/opt/cni/bin/vpcip-cni", check=False).returncode == 0, node.name
        conf = json.loads(node.run("cat", "/etc/cni/net.d/05-vpcip.conflist").stdout)
        assert conf == want_conf, f"{node.name}: installed conflist differs from the ConfigMap"
        # The executable runs on the node as the runtime runs it (the host's python3).
        v = node.run("env", "CNI_COMMAND=VERSION", "/opt/cni/bin/vpcip-cni", check=False)
        assert v.returncode == 0, f"{node.name}: vpcip-cni VERSION failed: {v.stdout} {v.stderr}"
        assert "1.0.0" in json.loads(v.stdout)["supportedVersions"], v.stdout


def _agent_status(cluster: H.Cluster, node: str) -> dict:
    pod = cluster.agent_pod(node)["metadata"]["name"]
    return json.loads(cluster.exec((H.AGENT_NS, pod), "policy-agent", "status", "--json").stdout)


def test_agent_reaches_the_api_server_through_the_kubernetes_service(cluster):
    svc = cluster.get("svc", "-n", "default", "kubernetes")
    assert svc["spec"]["clusterIP"] == KUBERNETES_SVC
    all_pods = cluster.get("pods", "-A")["items"]
    for node in cluster.nodes:
        pod = cluster.agent_pod(node.name)
        name = pod["metadata"]["name"]
        # kubelet gave the in-cluster client the Service address (no kubeconfig in the pod).
        env = cluster.exec((H.AGENT_NS, name), "env").stdout.splitlines()
        assert f"KUBERNETES_SERVICE_HOST={KUBERNETES_SVC}" in env, env
        assert not any(e.startswith("KUBECONFIG=") for e in env), env
        st = _agent_status(cluster, node.name)
        assert st["ready"] and st["in_sync"], st
        assert st["node"] == node.name
        assert st["counts"]["namespaces"] >= 4 and st["counts"]["pods"] >= 1, st["counts"]
        # Its watch connection went through kube-proxy's DNAT in the node's namespace:
        # dst 10.96.0.1:443 on the way out, answered by the API server 10.240.0.2:6443.
        ct = node.run("conntrack", "-L", "-p", "tcp", "--orig-dst", KUBERNETES_SVC, "--dport", "443").stdout
        dnat = [ln for ln in ct.splitlines()
                if "ESTABLISHED" in ln and f"src={API_SERVER}" in ln and "sport=6443" in ln]
        assert dnat, f"{node.name}: no established connection to {KUBERNETES_SVC}:443 DNATed to {API_SERVER}:6443:\n{ct}"
    assert all_pods
