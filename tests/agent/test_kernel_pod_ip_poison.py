"""Issue 10 item 1, as a tenant writes it, against the real kernel with real traffic.

A tenant with "edit" in namespace ``tenant`` creates pods with no status IP and a
forged ``vpc.amazonaws.com/pod-ips`` annotation (0.0.0.0, ::, loopback, multicast,
link-local, mapped 0.0.0.0), each with a container port named ``web``, and a
policy ``podSelector: {}`` / ``ingress: [{ports: [{port: web}]}]``; one anchor pod
of ``tenant`` runs on the node, so the policy is active and its named-port set
(hash:ip,port) is programmed. Before the fix 0.0.0.0 became a member, the kernel
refused the whole ipset restore, and every later apply failed: a default-deny
in *another* namespace was never enforced.

Checked with trust of the annotation off (the default: it is never read) and on
(limited to the pod networks: each forged address is refused and reported).
"""

from __future__ import annotations

import ipaddress

import pytest
from agent_helpers import wait_for
from helpers.agent_process import write_atomic
from helpers.kernel_lab import node_with_pods

from policy_agent.agent import Agent
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.lab import netns
from policy_agent.model.types import PodIPPolicy
from policy_agent.shared.naming import policy_chain, veth_name
from policy_agent.sources.cni import CniSource
from policy_agent.sources.manifests import ManifestSource

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PORT = 8080
# Local pods: (namespace, name) -> address in the lab range.
LOCAL = {("tenant", "anchor"): "10.233.71.2", ("other", "victim"): "10.233.71.3", ("client", "c"): "10.233.71.4"}
FORGED = ["0.0.0.0", "::", "127.0.0.1", "224.0.0.1", "169.254.1.1", "::ffff:0.0.0.0"]
LAB_NETWORKS = (ipaddress.ip_network("10.233.0.0/16"), ipaddress.ip_network("fd00:233::/64"))


def _pod(ns: str, name: str, status: str, annotation: str = "") -> str:
    ann = f", annotations: {{vpc.amazonaws.com/pod-ips: '{annotation}'}}" if annotation else ""
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}{ann}}}\n"
        f"spec: {{nodeName: n1, containers: [{{name: c, ports: [{{name: web, containerPort: {PORT}}}]}}]}}\n"
        f"status: {status}\n"
    )


def _cluster_yaml() -> str:
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n" for n in ("tenant", "other", "client")]
    docs += [_pod(ns, name, f"{{phase: Running, podIPs: [{{ip: {ip}}}]}}") for (ns, name), ip in LOCAL.items()]
    # The tenant's poison: no status IP, the forged annotation, a port named like the policy's.
    docs += [_pod("tenant", f"poison{i}", "{phase: Pending}", addr) for i, addr in enumerate(FORGED)]
    docs.append(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: tenant}\n"
        "spec: {podSelector: {}, ingress: [{ports: [{port: web}]}]}\n"
    )
    return "---\n".join(docs)


DENY_OTHER = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: other}
spec: {podSelector: {}}
"""


@pytest.fixture
def lab():
    pods = {key: netns.unique_name("h1", f"pip{key[1][:6]}") for key in LOCAL}
    with node_with_pods(netns.unique_name("h1", "pipnode"), pods, {k: [ip] for k, ip in LOCAL.items()},
                        lambda key: veth_name("eni", *key), serve=[("other", "victim")], tcp_ports=[PORT]) as made:
        yield made


def _client_reaches_victim(pods) -> bool:
    return netns.probe(pods[("client", "c")], LOCAL[("other", "victim")], PORT, "TCP", timeout=1.0)


@pytest.mark.parametrize("trust", [False, True], ids=["annotation-untrusted-default", "annotation-trusted-in-range"])
def test_forged_pod_ips_annotation_cannot_stop_enforcement(lab, tmp_path, trust):
    node, pods = lab
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "cluster.yaml").write_text(_cluster_yaml())
    if trust:
        policy = PodIPPolicy(LAB_NETWORKS, trust_annotation=True)
        sources = [ManifestSource(str(mdir), pod_ip_policy=policy), CniSource(str(tmp_path / "endpoints"))]
        extra = {"pod_ip_policy": policy}
    else:  # exactly what `policy-agent run --manifests DIR` builds with default settings
        sources = [ManifestSource(str(mdir)), CniSource(str(tmp_path / "endpoints"))]
        extra = {}
    agent = Agent(NodeConfig("n1"), Dataplane(netns=node), sources, status_dir=str(tmp_path / "status"),
                  min_interval=0.02, refresh_interval=5, **extra)
    agent.start()
    try:
        assert agent.wait_ready(60), agent.status()
        assert _client_reaches_victim(pods)  # nothing isolates other/victim yet: the probe works

        # The tenant's policy is programmed: its named-port set exists, only real addresses in it.
        dp = Dataplane(netns=node)
        save = dp.kernel.iptables_save(4)
        assert policy_chain("tenant", "web", "ingress") in save

        write_atomic(mdir / "deny.yaml", DENY_OTHER)
        wait_for(lambda: not _client_reaches_victim(pods), 30, "default-deny in namespace other enforced")
        assert policy_chain("other", "deny-all", "ingress") in Dataplane(netns=node).kernel.iptables_save(4)
        st = agent.status()
        assert agent.applied_generation == agent.observed_generation, st
        assert not agent.last_apply_error, agent.last_apply_error

        # The poison pods survive as pods (selected, labelled) with no address.
        snap = agent.store.snapshot()
        for i in range(len(FORGED)):
            p = snap.pods[("tenant", f"poison{i}")]
            assert p.ips == () and p.labels["app"] == f"poison{i}"
        recent = [e for e in agent.store.errors if e["kind"] == "Pod" and e["key"].startswith("tenant/poison")]
        if trust:  # read, refused, reported once each with the field
            assert len(recent) == len(FORGED)
            assert all("metadata.annotations[vpc.amazonaws.com/pod-ips]" in e["message"] for e in recent)
            text = agent.metrics.render().decode()
            assert 'policy_agent_pod_ip_rejected_total{reason="unspecified"} 3.0' in text
        else:  # never read
            assert recent == []
    finally:
        agent.stop()
