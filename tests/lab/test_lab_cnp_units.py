"""The lab takes ClusterNetworkPolicy and Node objects (cluster-scoped keys, validated by the agent's parser)."""

from __future__ import annotations

import pytest

from policy_agent.lab import lab as L

CNP = """
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: x, namespace: ignored}
spec: {tier: Admin, priority: 1, subject: {namespaces: {}}}
---
apiVersion: v1
kind: Node
metadata: {name: w1, labels: {role: infra}}
status: {addresses: [{type: InternalIP, address: 10.233.9.1}]}
"""


def test_load_docs_takes_cluster_network_policies_and_nodes(tmp_path):
    f = tmp_path / "cnp.yaml"
    f.write_text(CNP)
    docs = L.load_docs([str(f)])
    assert [L.obj_key(d) for d in docs] == ["ClusterNetworkPolicy/x", "Node/w1"]
    assert "namespace" not in docs[0]["metadata"]  # cluster-scoped
    # a deletion stub from a truth-table step (namespace filled in) keys the same
    assert L.obj_key({"kind": "ClusterNetworkPolicy", "metadata": {"name": "x", "namespace": "default"}}) == \
        "ClusterNetworkPolicy/x"
    f.write_text(CNP.replace("priority: 1", "priority: 1001"))
    with pytest.raises(L.LabError, match="ClusterNetworkPolicy x: spec.priority"):
        L.load_docs([str(f)])


def test_peer_node_addresses_must_stay_inside_the_lab_networks():
    """A Node other than the lab's own becomes a namespace holding its addresses: those must be
    lab addresses (they exist only in lab namespaces) and nobody else's."""
    lab = L.Lab("unit-peer")
    node = {"kind": "Node", "metadata": {"name": "w1"},
            "status": {"addresses": [{"type": "Hostname", "address": "w1"},
                                     {"type": "InternalIP", "address": "10.233.97.1"},
                                     {"type": "InternalIP", "address": "fd00:233::97:1"}]}}
    assert lab._node_addresses(node) == ["10.233.97.1", "fd00:233::97:1"]
    outside = {**node, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}
    with pytest.raises(L.LabError, match=r"Node w1: status.addresses 192.0.2.1 is outside the lab networks"):
        lab._node_addresses(outside)
    lab.pods["x/a"] = L.PodState("x", "a", "ns", "eni1", ["10.233.97.1"])
    with pytest.raises(L.LabError, match="already a pod's or another node's address"):
        lab._node_addresses(node)
