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
