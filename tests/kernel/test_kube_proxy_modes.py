"""kube-proxy on the same node, emulated in a private node netns with real traffic.

- iptables mode (nat KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP DNAT, filter KUBE-FORWARD)
  and nftables mode (table ip kube-proxy, dstnat at priority -100 on prerouting and
  output): a ClusterIP in front of a local backend pod; our FORWARD rules see the
  post-DNAT address and port, so the backend's ingress policy decides.
- IPVS mode (a link named kube-ipvs0): `policy-agent run` refuses to start, says why,
  and writes nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from helpers.desired_fixtures import pod
from helpers.kernel_lab import backends, can, node_with_pods

from policy_agent.compiler import compile as compile_state
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.kernel import binary, legacy_available
from policy_agent.lab import netns
from policy_agent.model.types import (
    ClusterSnapshot,
    LabelSelector,
    Labels,
    NetworkPolicy,
    Peer,
    PolicyPort,
    PolicyType,
    Protocol,
    Rule,
)
from policy_agent.shared.naming import veth_name

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NODE = "n1"
VIP, VPORT, TPORT = "10.233.250.10", 80, 8080  # ClusterIP:port -> backend targetPort
PODS = {  # name -> (ip, labels)
    "web": ("10.233.72.3", {"app": "web"}),
    "good": ("10.233.72.4", {"app": "client", "x": "yes"}),
    "bad": ("10.233.72.5", {"app": "client"}),
}
SVC = "KUBE-SVC-H4WEBSVC0000000"  # kube-proxy's chain names are hashes; these only look alike
SEP = "KUBE-SEP-H4WEBSEP0000000"

IPTABLES_MODE = f"""*nat
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:{SVC} - [0:0]
:{SEP} - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d {VIP}/32 -p tcp -m comment --comment "x/web:http cluster IP" -m tcp --dport {VPORT} -j {SVC}
-A {SVC} ! -s 10.233.0.0/16 -d {VIP}/32 -p tcp -m comment --comment "x/web:http cluster IP" -m tcp --dport {VPORT} -j KUBE-MARK-MASQ
-A {SVC} -m comment --comment "x/web:http -> {PODS['web'][0]}:{TPORT}" -j {SEP}
-A {SEP} -s {PODS['web'][0]}/32 -m comment --comment "x/web:http" -j KUBE-MARK-MASQ
-A {SEP} -p tcp -m comment --comment "x/web:http" -m tcp -j DNAT --to-destination {PODS['web'][0]}:{TPORT}
COMMIT
*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""

# The shape kube-proxy's nftables mode gives its table (pkg/proxy/nftables): base chains
# at dstnat priority on prerouting and output, a service-ips verdict map, per-service and
# per-endpoint chains, and its own filter chains at priority filter - 10.
NFTABLES_MODE = f"""
table ip kube-proxy {{
    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ {VIP} . tcp . {VPORT} : goto service-h4web-x/web/tcp/http }}
    }}
    map no-endpoint-services {{
        type ipv4_addr . inet_proto . inet_service : verdict
    }}
    chain mark-for-masquerade {{
        meta mark set meta mark | 0x00004000
    }}
    chain services {{
        ip daddr . meta l4proto . th dport vmap @service-ips
    }}
    chain service-h4web-x/web/tcp/http {{
        ip daddr {VIP} tcp dport {VPORT} ip saddr != 10.233.0.0/16 jump mark-for-masquerade
        numgen random mod 1 vmap {{ 0 : goto endpoint-h4web-x/web/tcp/http__{PODS['web'][0]}/{TPORT} }}
    }}
    chain endpoint-h4web-x/web/tcp/http__{PODS['web'][0]}/{TPORT} {{
        ip saddr {PODS['web'][0]} jump mark-for-masquerade
        meta l4proto tcp dnat to {PODS['web'][0]}:{TPORT}
    }}
    chain dstnat {{
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }}
    chain nat-output {{
        type nat hook output priority -100; policy accept;
        jump services
    }}
    chain service-endpoints-check {{
        ip daddr . meta l4proto . th dport vmap @no-endpoint-services
    }}
    chain filter-forward {{
        type filter hook forward priority -110; policy accept;
        ct state new jump service-endpoints-check
    }}
    chain filter-output {{
        type filter hook output priority -110; policy accept;
        ct state new jump service-endpoints-check
    }}
}}
"""


def _uplink(node: str) -> None:
    # a stand-in uplink with the node's address and default route: a locally
    # generated packet to the ClusterIP needs a route before OUTPUT dnat rewrites it
    netns.ip(node, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1")
    for link in ("uplink0", "uplink1"):
        netns.ip(node, "link", "set", link, "up")
    netns.ip(node, "addr", "add", "10.233.72.254/32", "dev", "uplink0")
    netns.ip(node, "route", "add", "default", "dev", "uplink0")


@pytest.fixture(params=backends())
def svc_lab(request):
    pods = {p: netns.unique_name("h4kp", p) for p in PODS}
    with node_with_pods(netns.unique_name("h4kp", "node"), pods, {p: [ip] for p, (ip, _) in PODS.items()},
                        lambda p: veth_name("eni", "x", p), serve=["web"], tcp_ports=(TPORT,),
                        server_name=str, setup_node=_uplink) as (node, pods):
        yield request.param, node, pods


def _snapshot() -> ClusterSnapshot:
    pods = [pod("x", p, ip, node=NODE, labels=labels) for p, (ip, labels) in PODS.items()]
    # the backend admits only pods labelled x=yes, on the targetPort (what it sees after DNAT)
    allow_x = NetworkPolicy(
        "x", "web-from-x", LabelSelector(Labels({"app": "web"})), (PolicyType.INGRESS,),
        ingress=(Rule((PolicyPort(Protocol.TCP, TPORT),), (Peer(pod_selector=LabelSelector(Labels({"x": "yes"}))),)),),
    )
    return ClusterSnapshot.of([*pods, allow_x])


def _policy_hits(backend: str, node: str) -> int:
    text = netns.run(node, binary(backend, 4, "save"), "-c").stdout
    hits = [int(m.group(1)) for m in re.finditer(r"^\[(\d+):\d+\] -A pa-pi-\S+ .*x/web-from-x ingress", text, re.M)]
    assert hits, text
    return sum(hits)


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_policy_applies_to_the_backend_behind_a_cluster_ip(svc_lab, mode):
    backend, node, pods = svc_lab
    if mode == "iptables":
        netns.run(node, binary(backend, 4, "restore"), "--noflush", input=IPTABLES_MODE)
    else:
        netns.run(node, "nft", "-f", "-", input=NFTABLES_MODE)
        assert "table ip kube-proxy" in netns.run(node, "nft", "list", "tables").stdout
    # kube-proxy is there first (as on a real node); our jumps go above its own
    Dataplane(netns=node, backend=backend).apply(compile_state(_snapshot(), NodeConfig(NODE)), allow_sweep=True)

    assert can(pods["good"], VIP, VPORT)  # allowed by the policy: through the ClusterIP
    assert not can(pods["bad"], VIP, VPORT)  # not selected by the policy: denied through the ClusterIP
    # the same verdicts straight to the pod: the service adds no path around policy
    assert can(pods["good"], PODS["web"][0], TPORT) and not can(pods["bad"], PODS["web"][0], TPORT)
    # our policy rule matched the post-DNAT port (the policy names 8080, clients dial 80)
    assert _policy_hits(backend, node) >= 2
    # the node itself through the ClusterIP (OUTPUT dnat): node -> own pods is not policed
    assert can(node, VIP, VPORT)


# --- IPVS mode: refuse to start ---------------------------------------------------------

MANIFESTS = """\
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: x, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIPs: [{ip: 10.233.73.3}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}}
"""


def _ours(node: str) -> list[str]:
    """Every trace of the agent in the node netns: rules/chains (both backends) and sets."""
    found = []
    backends = ["nft"] + (["legacy"] if legacy_available() else [])
    for b in backends:
        for family in (4, 6):
            found += [ln for ln in netns.run(node, binary(b, family, "save")).stdout.splitlines() if "pa-" in ln]
    found += [ln for ln in netns.run(node, "ipset", "save").stdout.splitlines() if re.search(r"\bpa[46]", ln)]
    return found


def _agent(node: str, tmp_path, *extra: str) -> subprocess.Popen:
    mdir = tmp_path / "manifests"
    mdir.mkdir(exist_ok=True)
    (mdir / "x.yaml").write_text(MANIFESTS)
    env = {**os.environ, "POLICY_AGENT_METRICS_PORT": "0"}
    cmd = [sys.executable, "-m", "policy_agent.cli", "run", "--node", NODE, "--netns", node,
           "--manifests", str(mdir), "--endpoint-dir", str(tmp_path / "ep"), "--status-dir", str(tmp_path / "st"),
           "--state-file", str(tmp_path / "dp.json"), *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def ipvs_node():
    node = netns.unique_name("h4ipvs", "node")
    try:
        netns.create(node)
        yield node
    finally:
        netns.delete(node)


def test_run_refuses_to_start_when_kube_proxy_is_in_ipvs_mode(ipvs_node, tmp_path):
    node = ipvs_node
    # kube-proxy's IPVS link holding a service VIP (kube-proxy uses a dummy link; this
    # kernel has no dummy driver, and only the name is what marks IPVS mode)
    netns.ip(node, "link", "add", "kube-ipvs0", "type", "bridge")
    netns.ip(node, "addr", "add", f"{VIP}/32", "dev", "kube-ipvs0")
    proc = _agent(node, tmp_path)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode != 0, (out, err)
    assert f"kube-proxy IPVS mode detected in network namespace {node}" in err
    assert "a link named kube-ipvs0 exists" in err  # what was found
    assert "ingress policy" in err and "skipped for service traffic" in err  # why
    assert "Run kube-proxy in iptables or nftables mode" in err  # what to do
    assert _ours(node) == []  # nothing written
    assert not (tmp_path / "dp.json").exists()

    # the same agent starts once the IPVS link is gone (the refusal is about IPVS only)
    netns.ip(node, "link", "del", "kube-ipvs0")
    proc = _agent(node, tmp_path, "--iptables-backend", "nft", "--refresh-interval", "1")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if any("pa-INPUT" in ln for ln in _ours(node)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        assert any("pa-pi-x.deny-all" in ln for ln in _ours(node))
        # kube-proxy switches to IPVS after the agent started (a booting node): the agent
        # notices on its next check and exits non-zero, leaving its rules enforcing.
        netns.ip(node, "link", "add", "kube-ipvs0", "type", "bridge")
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert "kube-proxy IPVS mode detected" in err
        assert any("pa-pi-x.deny-all" in ln for ln in _ours(node))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
