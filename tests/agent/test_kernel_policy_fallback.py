"""Real kernel, real traffic: an unparseable NetworkPolicy never opens a pod.

The agent (manifest source) in a node netns with pod netns behind veths: a pod
isolated by a policy that becomes unparseable stays isolated (its last good version
keeps enforcing), and a brand-new unparseable policy isolates its pods with no allow
rules (the fallback), visible in status, metrics and the iptables-save comments.
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

IPS = {"a": "10.233.93.2", "b": "10.233.93.3", "c": "10.233.93.4"}
PORT = 8080


ISOLATE_B = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 8080}]
"""
# Unparseable: an ipBlock with leading zeros (older API servers stored these).
ISOLATE_B_BAD = ISOLATE_B.replace(
    "[{podSelector: {matchLabels: {app: a}}}]", "[{podSelector: {matchLabels: {app: a}}}, {ipBlock: {cidr: 010.0.0.0/8}}]"
)
NEW_BAD_FOR_C = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate-c, namespace: x}
spec:
  podSelector: {matchLabels: {app: c}}
  ingress:
  - from: [{ipBlock: {cidr: 010.0.0.0/8}}]
"""


@pytest.fixture
def lab():
    pods = {p: netns.unique_name("h3", f"fb{p}") for p in IPS}
    with node_with_pods(netns.unique_name("h3", "fbnode"), pods, {p: [ip] for p, ip in IPS.items()},
                        lambda p: veth_name("eni", "x", p), serve=("b", "c"), tcp_ports=[PORT]) as made:
        yield made


def _reach(pods, src: str, dst: str) -> bool:
    return netns.probe(pods[src], IPS[dst], PORT, "TCP", timeout=1.0)


def _eventually(pods, src: str, dst: str, want: bool) -> None:
    wait_for(lambda: _reach(pods, src, dst) == want, 60, what=f"{src}->{dst} {'allowed' if want else 'denied'}")


def test_unparseable_policy_never_opens_a_pod(lab, tmp_path):
    node, pods = lab
    with manifest_agent(node, tmp_path, {"pods.yaml": pods_yaml(IPS)}) as (agent, mdir):
        assert agent.wait_ready(60), agent.status()
        assert _reach(pods, "a", "b") and _reach(pods, "c", "b") and _reach(pods, "a", "c")

        write_atomic(mdir / "isolate-b.yaml", ISOLATE_B)
        _eventually(pods, "c", "b", False)
        assert _reach(pods, "a", "b")

        # The policy becomes unparseable: its last good version keeps enforcing.
        write_atomic(mdir / "isolate-b.yaml", ISOLATE_B_BAD)
        wait_for(lambda: any("x/isolate-b" in e["message"] for e in agent.status()["errors"]["recent"]),
                 what="error in the status error history")
        wait_for(lambda: degraded(agent, "last_good") == 1, what="last_good gauge")
        assert not _reach(pods, "c", "b"), "denied probe became allowed"
        assert _reach(pods, "a", "b")

        # A brand-new unparseable policy: its pods are isolated, nothing allowed.
        write_atomic(mdir / "isolate-c.yaml", NEW_BAD_FOR_C)
        _eventually(pods, "a", "c", False)
        assert not _reach(pods, "b", "c")
        wait_for(lambda: degraded(agent, "fallback") == 1, what="fallback gauge")
        msgs = [e["message"] for e in agent.status()["errors"]["recent"]]
        assert any("x/isolate-c" in m and "spec.ingress[0].from[0].ipBlock.cidr" in m for m in msgs), msgs
        save = Dataplane(netns=node).kernel.iptables_save(4)
        assert "x/isolate-c ingress fallback: spec.ingress_0_.from_0_.ipBlock.cidr" in save
        # Still: the bad edit of isolate-b did not open b.
        assert not _reach(pods, "c", "b") and _reach(pods, "a", "b")

        # Fixed: the real policy replaces the fallback (here it allows b -> c).
        write_atomic(mdir / "isolate-c.yaml", NEW_BAD_FOR_C.replace("ipBlock: {cidr: 010.0.0.0/8}",
                                                               "podSelector: {matchLabels: {app: b}}"))
        _eventually(pods, "b", "c", True)
        assert not _reach(pods, "a", "c")
        wait_for(lambda: degraded(agent, "fallback") == 0, what="fallback gauge back to 0")
