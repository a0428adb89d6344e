"""Attacks a namespace tenant can write, run against `policy-agent run` on a real kernel.

Each test writes the objects exactly as a tenant with "edit" rights in its own
namespace could (YAML in the agent's manifest directory, the same objects the API
would hand over), starts the real agent process in a private node namespace, and
proves with real TCP probes that the attack neither stops enforcement elsewhere
nor opens anything. The tenant here is namespace ``tenant``; the victims live in
``prod``; ``other`` holds an unrelated pod whose address the tenant tries to borrow.

Attacks from issue 10 covered elsewhere (same tier of evidence, real kernel):
- pod -> node traffic bypassing host INPUT rules: tests/kernel/test_host_traffic.py
- kube-proxy IPVS / nftables service paths: tests/kernel/test_kube_proxy_modes.py
- late / repeated CNI DEL or GC of an old sandbox, pod recreated under the same
  name: tests/cni/test_cni_identity_kernel.py
- a kernel-refused set or chain among good ones: tests/kernel/dataplane/test_isolation_kernel.py
"""

from __future__ import annotations

import json

import pytest
from helpers.agent_process import AgentProcess, wait_for, write_atomic
from helpers.kernel_lab import node_with_pods

from policy_agent.dataplane.apply import Dataplane
from policy_agent.lab import netns
from policy_agent.shared.naming import veth_name

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PORT = 8080
# Local pods with a real veth and a server: (namespace, pod) -> address.
LOCAL = {
    ("tenant", "anchor"): "10.233.71.2",
    ("tenant", "client"): "10.233.71.3",
    ("prod", "web"): "10.233.71.10",
    ("prod", "db"): "10.233.71.11",
    ("prod", "api"): "10.233.71.12",
    ("other", "intruder"): "10.233.71.20",
}
LABELS = {
    ("tenant", "anchor"): {"app": "anchor"},
    ("tenant", "client"): {"app": "client", "role": "client"},
    ("prod", "web"): {"app": "web"},
    ("prod", "db"): {"app": "db"},
    ("prod", "api"): {"app": "api"},
    ("other", "intruder"): {"app": "intruder"},
}
# Addresses a tenant writes into the user-writable AWS annotation (issue 10, item 1):
# each of these classes makes `ipset restore` refuse a batch, or is not a pod's address.
POISON = {
    "zero4": "0.0.0.0",
    "zero6": "::",
    "loop4": "127.0.0.1",
    "loop6": "::1",
    "mcast": "224.0.0.1",
    "llocal": "169.254.1.1",
    "mapped": "::ffff:0.0.0.0",
}


def _ns_yaml(name: str) -> str:
    return f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"


def _pod_yaml(ns: str, name: str, labels: dict, ip: str | None = None, annotation: str | None = None,
              named_port: str | None = None) -> str:
    meta = {"name": name, "namespace": ns, "labels": labels}
    if annotation is not None:
        meta["annotations"] = {"vpc.amazonaws.com/pod-ips": annotation}
    container: dict = {"name": "c", "image": "i"}
    if named_port:
        container["ports"] = [{"name": named_port, "containerPort": PORT}]
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
           "spec": {"nodeName": "n1", "containers": [container]},
           "status": {"podIPs": [{"ip": ip}]} if ip else {"phase": "Pending"}}
    return json.dumps(doc) + "\n"  # JSON is YAML


def _base_objects() -> str:
    docs = [_ns_yaml(n) for n in ("tenant", "prod", "other")]
    for (ns, pod), ip in LOCAL.items():
        docs.append(_pod_yaml(ns, pod, LABELS[(ns, pod)], ip, named_port="web" if ns == "tenant" else None))
    return "---\n".join(docs)


# The tenant's own policy: everything in its namespace, ingress on the named port `web`.
# With a poison pod in the namespace, its named-port set gets the poison address.
TENANT_NAMED_PORT = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named-web, namespace: tenant}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: web}]
"""

# prod's database trusts the tenant's pods labelled role=client (a real pattern:
# a monitoring or batch namespace is allowed into a service).
DB_FROM_TENANT_CLIENTS = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-clients, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: tenant}}
      podSelector: {matchLabels: {role: client}}
"""

# Written after the attack: a default-deny for prod's web tier.
WEB_DENY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-deny, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
"""

# A policy the API server stored but our parser cannot read (leading zeros: older API
# servers accepted them). It was meant to isolate api and allow only a legacy range.
API_UNPARSEABLE = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-legacy, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{ipBlock: {cidr: 010.0.0.0/8}}]
"""


@pytest.fixture
def node(tmp_path):
    """A node namespace with one pod namespace per local pod, each serving PORT."""
    pods = {key: netns.unique_name("adv", f"p{i}") for i, key in enumerate(LOCAL)}
    with node_with_pods(netns.unique_name("adv", "node"), pods, {k: [ip] for k, ip in LOCAL.items()},
                        lambda key: veth_name("eni", *key),
                        serve=(("prod", "web"), ("prod", "db"), ("prod", "api"), ("tenant", "anchor")),
                        tcp_ports=[PORT]) as lab:
        yield lab


def _reach(pods, src: tuple[str, str], dst: tuple[str, str]) -> bool:
    return netns.probe(pods[src], LOCAL[dst], PORT, "TCP", timeout=1.0)


def _eventually(pods, src, dst, want: bool, timeout: float = 30.0) -> None:
    wait_for(lambda: _reach(pods, src, dst) == want, timeout, f"{src}->{dst} {'allowed' if want else 'denied'}")


def _ipset_members(node_ns: str) -> str:
    return netns.run(node_ns, "ipset", "save").stdout


EXTERNAL = "10.234.0.5"  # a host outside the pod networks (its own netns, a non-pod link)


@pytest.mark.parametrize("trust", [False, True], ids=["annotation-ignored", "annotation-trusted"])
def test_poison_annotation_pods_stop_nothing_and_bind_nothing(node, tmp_path, trust):
    """Items 1 and 2: poison addresses and borrowed addresses in the annotation."""
    node_ns, pods = node
    ext = netns.unique_name("adv", "ext")
    env = {"POLICY_AGENT_POD_NETWORKS": "10.233.0.0/16"}
    if trust:
        env["POLICY_AGENT_TRUST_POD_IPS_ANNOTATION"] = "true"
    agent = AgentProcess(node_ns, tmp_path, env)
    docs = [_base_objects(), TENANT_NAMED_PORT, DB_FROM_TENANT_CLIENTS]
    # One pod per poison class, no status IP, a container port named like the policy's.
    for tag, addr in POISON.items():
        docs.append(_pod_yaml("tenant", f"poison-{tag}", {"app": "poison"}, annotation=addr, named_port="web"))
    # Pods labelled like prod's trusted clients, claiming the address of a pod in another
    # namespace and of a host outside the pod networks (item 2).
    docs.append(_pod_yaml("tenant", "borrow-pod", {"role": "client"}, annotation=LOCAL[("other", "intruder")]))
    docs.append(_pod_yaml("tenant", "borrow-ext", {"role": "client"}, annotation=EXTERNAL))
    write_atomic(agent.mdir / "tenant.yaml", "---\n".join(docs))
    try:
        netns.create(ext)
        netns.add_peer_link(node_ns, ext, "ext0", [EXTERNAL])
        agent.start()
        # The genuine client is allowed (the policy works; nothing was over-narrowed).
        assert _reach(pods, ("tenant", "client"), ("prod", "db"))
        assert _reach(pods, ("tenant", "client"), ("tenant", "anchor"))
        # A host outside the pod networks never inherits a tenant's labels.
        assert not netns.probe(ext, LOCAL[("prod", "db")], PORT, "TCP", timeout=1.0)
        # Another pod's address: ignored by default. Trusting the annotation trusts it
        # inside pod_networks, which is the documented risk of turning trust on
        # (docs/decisions/pod-ip-trust.md): the borrowed pod address is let in.
        assert _reach(pods, ("other", "intruder"), ("prod", "db")) == trust

        # A later default-deny in ANOTHER namespace is enforced: applies still succeed.
        assert _reach(pods, ("other", "intruder"), ("prod", "web"))
        write_atomic(agent.mdir / "web-deny.yaml", WEB_DENY)
        _eventually(pods, ("other", "intruder"), ("prod", "web"), False)
        _eventually(pods, ("tenant", "client"), ("prod", "web"), False)
        assert _reach(pods, ("tenant", "client"), ("prod", "db"))

        # Kernel contents: no poison address in any of our sets, and the tenant's
        # client set holds no borrowed address it was not told to trust.
        adds = [ln.split() for ln in _ipset_members(node_ns).splitlines() if ln.startswith("add ")]
        member_addr = [(a[1], a[2].split(",")[0]) for a in adds]
        for addr in POISON.values():
            assert not any(m == addr for _, m in member_addr), (addr, adds)
        assert not any(m == EXTERNAL for _, m in member_addr), adds
        client_sets = {s for s, m in member_addr if m == LOCAL[("tenant", "client")]}
        assert client_sets, adds  # the genuine client is in a peer set
        borrowed = LOCAL[("other", "intruder")]
        in_client_sets = any(s in client_sets and m == borrowed for s, m in member_addr
                             if not s.startswith(("pa4e-", "pa6e-")))  # local endpoints: its own entry
        assert in_client_sets == trust, adds

        rejected = agent.events("pod_ip_rejected")
        if trust:
            # Each rejection is named: the pod, the field and the address.
            for tag in POISON:
                assert any(e.get("pod") == f"tenant/poison-{tag}" and "annotations" in e.get("field", "")
                           for e in rejected), (tag, rejected)
            assert any(e.get("pod") == "tenant/borrow-ext" and e.get("address") == EXTERNAL for e in rejected)
        else:
            assert rejected == []  # the annotation is not an address source at all
        assert not agent.events("apply_failed"), agent.events("apply_failed")
    finally:
        agent.stop()
        netns.delete(ext)


def test_unparseable_policy_isolates_instead_of_opening(node, tmp_path):
    """Item 3: a policy our parser cannot read isolates its pods; it never opens them."""
    node_ns, pods = node
    agent = AgentProcess(node_ns, tmp_path)
    write_atomic(agent.mdir / "base.yaml", _base_objects())
    try:
        agent.start()
        assert _reach(pods, ("tenant", "client"), ("prod", "api"))  # nothing isolates api yet
        write_atomic(agent.mdir / "api.yaml", API_UNPARSEABLE)
        # Fallback: podSelector and policyTypes parse, so api is isolated with no allow rule.
        _eventually(pods, ("tenant", "client"), ("prod", "api"), False)
        assert not _reach(pods, ("other", "intruder"), ("prod", "api"))
        # Neighbours the policy does not select are untouched.
        assert _reach(pods, ("tenant", "client"), ("prod", "web"))
        save = Dataplane(netns=node_ns).kernel.iptables_save(4)
        assert "prod/api-legacy" in save and "fallback" in save, save
    finally:
        agent.stop()
