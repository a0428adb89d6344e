"""Bugs found in review, each a failing test marked xfail(strict) until it is fixed."""

from __future__ import annotations

import ipaddress
import os
import sys
import urllib.error
import urllib.request

import pytest

from policy_agent.agent import Agent
from policy_agent.compiler.core import compile
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.lab import netns
from policy_agent.model.parse import load_yaml
from policy_agent.model.types import ClusterSnapshot
from policy_agent.obs.server import ObsServer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "agent"))
from agent_helpers import ManualSource, make_pod, wait_for  # noqa: E402

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.233.77.1}]}
"""

EGRESS_POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: eg, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}]}]
"""

HALF_EXCEPT = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: half, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [128.0.0.0/1]}}]}]
"""


def _desired(*docs: str):
    objs = [o for d in docs for o in load_yaml(d)]
    return compile(ClusterSnapshot.of(objs), NodeConfig("n1", ipv6=False))


@pytest.fixture
def node_ns():
    with netns.scratch("rev", "node") as name:
        yield name


@pytest.mark.kernel
def test_foreign_jump_to_stale_chain_does_not_wedge_apply(node_ns):
    dp = Dataplane(netns=node_ns, backend="nft", families=(4,), retries=2, backoff=0.01)
    dp.apply(_desired(CLUSTER, EGRESS_POLICY), allow_sweep=True)
    # Someone else's chain jumps into our policy chain.
    netns.run(node_ns, "iptables-nft-restore", "--noflush",
              input="*filter\n:KUBE-X - [0:0]\n-A KUBE-X -j pa-po-x.eg\nCOMMIT\n")
    # The policy goes away: its chain is stale but still referenced by KUBE-X.
    dp.apply(_desired(CLUSTER), allow_sweep=True)  # must not raise: keep the chain, apply the rest
    save = netns.run(node_ns, "iptables-nft-save").stdout
    assert "no policy selects the pod for egress: allow" in save
    assert "-A KUBE-X -j pa-po-x.eg" in save  # foreign rule untouched


@pytest.mark.kernel
def test_ipblock_except_equal_to_half_of_slash0_is_stable(node_ns):
    dp = Dataplane(netns=node_ns, backend="nft", families=(4,), retries=2, backoff=0.01)
    desired = _desired(CLUSTER, HALF_EXCEPT)
    dp.apply(desired, allow_sweep=True)
    (name,) = [n for n in desired.ipsets if n.startswith("pa4b-")]
    for _ in range(3):
        dp.refresh()
        excepted_in_set = netns.run(node_ns, "ipset", "test", name, "200.1.1.1", check=False).returncode == 0
        assert not excepted_in_set, "an address in the except range matches the ipBlock set"
    assert dp.refresh().lines_written == 0


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_readyz_goes_unready_when_applies_keep_failing(tmp_path):
    kernel = FakeKernel()
    src = ManualSource("kube")
    agent = Agent(NodeConfig("n1"), Dataplane(kernel=kernel, retries=2, backoff=0.0), [src],
                  status_dir=str(tmp_path / "st"), min_interval=0.0, refresh_interval=0)
    server = ObsServer(agent, "127.0.0.1", 0)
    server.start()
    agent.start()
    try:
        src.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"])})
        src.in_sync()
        wait_for(lambda: _get(server.url + "/readyz") == 200, what="ready")
        kernel.fail_next = 10**6  # the kernel refuses every write from now on
        src.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"]),
                            ("x", "b"): make_pod("x", "b", [str(ipaddress.ip_address("10.233.0.11"))])})
        wait_for(lambda: agent._failures >= 3, timeout=60, what="three failed applies")
        assert _get(server.url + "/readyz") == 503
    finally:
        agent.stop()
        server.stop()
