"""Real kernel, real traffic: an unparseable ClusterNetworkPolicy never opens what it denied.

The agent (manifest source, as `run --manifests`) in a node netns with pod netns behind
veths. An Admin Deny that becomes unparseable keeps denying (its last good version), and
a brand-new unparseable Admin Deny denies its subject (the deny-all stand-in), visible in
status, metrics and the iptables-save comments; fixed, the real policy replaces it.
"""

from __future__ import annotations

import pytest
from agent_helpers import degraded, manifest_agent, wait_for
from helpers.agent_process import write_atomic
from helpers.kernel_lab import node_with_pods, pods_yaml

from policy_agent.dataplane.apply import Dataplane
from policy_agent.lab import netns
from policy_agent.shared.naming import veth_name

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

IPS = {"a": "10.233.94.2", "b": "10.233.94.3", "c": "10.233.94.4"}
PORT = 8080


# Admin: b accepts nothing from c (TCP and UDP); a NetworkPolicy could not re-open it.
DENY_C_TO_B = """\
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-c-to-b}
spec:
  tier: Admin
  priority: 5
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: b}}}}
  ingress:
  - name: no c
    action: Deny
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: c}}}}]
"""
# Unparseable (the API server's schema would take it, CEL aside): a port range start >= end.
DENY_C_TO_B_BAD = DENY_C_TO_B.replace(
    "    from:", "    protocols: [{tcp: {destinationPort: {range: {start: 9000, end: 8000}}}}]\n    from:")
# Never parsed: an egress Deny for c whose peer has an invalid CIDR.
NEW_BAD_FOR_C = """\
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-c-egress}
spec:
  tier: Admin
  priority: 7
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: c}}}}
  egress:
  - action: Deny
    to: [{networks: ["10.233.94.2/33"]}]
"""


@pytest.fixture
def lab():
    pods = {p: netns.unique_name("h4", f"cf{p}") for p in IPS}
    with node_with_pods(netns.unique_name("h4", "cfnode"), pods, {p: [ip] for p, ip in IPS.items()},
                        lambda p: veth_name("eni", "x", p), serve=("a", "b", "c"), tcp_ports=[PORT],
                        udp_ports=[PORT]) as made:
        yield made


def _reach(pods, src: str, dst: str, proto: str = "TCP") -> bool:
    return netns.probe(pods[src], IPS[dst], PORT, proto, timeout=1.0)


def _both(pods, src: str, dst: str) -> tuple[bool, bool]:
    return _reach(pods, src, dst, "TCP"), _reach(pods, src, dst, "UDP")


def _eventually(pods, src: str, dst: str, want: bool) -> None:
    wait_for(lambda: _both(pods, src, dst) == (want, want), 60,
             what=f"{src}->{dst} {'allowed' if want else 'denied'} (TCP and UDP)")


def test_unparseable_admin_deny_keeps_denying_and_never_parsed_denies_its_subject(lab, tmp_path):
    node, pods = lab
    with manifest_agent(node, tmp_path, {"pods.yaml": pods_yaml(IPS)}) as (agent, mdir):
        assert agent.wait_ready(60), agent.status()
        assert _both(pods, "c", "b") == (True, True) and _both(pods, "c", "a") == (True, True)

        write_atomic(mdir / "deny-c-to-b.yaml", DENY_C_TO_B)
        _eventually(pods, "c", "b", False)
        assert _both(pods, "a", "b") == (True, True)

        # The Admin Deny becomes unparseable: its last good version keeps denying.
        write_atomic(mdir / "deny-c-to-b.yaml", DENY_C_TO_B_BAD)
        wait_for(lambda: any("deny-c-to-b" in e["message"] and "spec.ingress[0].protocols[0].tcp" in e["message"]
                             for e in agent.status()["errors"]["recent"]), what="error in the status history")
        wait_for(lambda: degraded(agent, "last_good") == 1, what="last_good gauge")
        assert _both(pods, "c", "b") == (False, False), "a denied flow became allowed"
        assert _both(pods, "a", "b") == (True, True)

        # A brand-new unparseable Admin Deny on c's egress: c may send nothing (deny-all
        # stand-in for its subject, egress only); a and b are untouched.
        assert _both(pods, "c", "a") == (True, True)
        write_atomic(mdir / "deny-c-egress.yaml", NEW_BAD_FOR_C)
        _eventually(pods, "c", "a", False)
        wait_for(lambda: degraded(agent, "fallback") == 1, what="fallback gauge")
        assert _both(pods, "a", "c") == (True, True) and _both(pods, "b", "a") == (True, True)
        msgs = [e["message"] for e in agent.status()["errors"]["recent"]]
        assert any("deny-c-egress" in m and "spec.egress[0].to[0].networks[0]" in m
                   and "enforcing a fallback for deny-c-egress: Admin tier priority 7: Deny all egress" in m for m in msgs), msgs
        save = Dataplane(netns=node).kernel.iptables_save(4)
        assert ("admin tier cnp deny-c-egress priority 7 egress rule 0: Deny, rule name=deny-all stand-in, "
                "unparseable: spec.egress_0_.to_0_.networks_0_") in save, save
        assert _both(pods, "c", "b") == (False, False)

        # Fixed: the real policy (deny c -> a only on another port) replaces the stand-in.
        write_atomic(mdir / "deny-c-egress.yaml", NEW_BAD_FOR_C.replace("10.233.94.2/33", "10.233.94.9/32"))
        _eventually(pods, "c", "a", True)
        wait_for(lambda: degraded(agent, "fallback") == 0, what="fallback gauge back to 0")
        assert _both(pods, "c", "b") == (False, False)  # still the last good deny-c-to-b
