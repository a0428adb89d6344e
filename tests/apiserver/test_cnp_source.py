"""The ClusterNetworkPolicy and Node informers against the real kube-apiserver.

1. Without the CRD the source still goes InSync (the resource is an empty list), logs
   ``kube_resource_not_served`` once however often it re-checks, and reports no error.
2. A CRD installed while the source runs is picked up by the re-check; a policy is
   created, updated and deleted and each step arrives as the model value; deleting the
   CRD (with a policy in it) empties the kind and goes back to "not served", once.
3. Nodes arrive with labels and IP addresses only, and follow label/address changes.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
from cnp_helpers import CRD_NAME, cnp, crd_installed, install_crd, kubectl_apply, remove_crd
from kube_helpers import Recorder, wait_for
from structlog.testing import capture_logs

from policy_agent.model.types import CNPAction, CNPTier
from policy_agent.sources.events import Replace
from policy_agent.sources.kube import KubeSource, WatchOptions

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(900)]

FAST = WatchOptions(not_served_recheck=0.3, backoff_initial=0.1, backoff_max=1.0)


def _events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in list(logs) if e.get("event") == name]


def test_without_crd_in_sync_then_crd_installed_used_and_removed(cluster):
    if crd_installed(cluster):
        if cluster.local is None:
            pytest.skip(f"the external cluster serves {CRD_NAME}; not removing it")
        remove_crd(cluster)  # a test before this one installed it
    rec = Recorder()
    name = f"pa-src-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with capture_logs() as logs:
        src = KubeSource(rec, cluster.api_client(), kinds=("Namespace", "ClusterNetworkPolicy"), options=FAST).start()
        try:
            assert src.wait_synced(60), "not in sync without the CRD"
            inf = src.informers["ClusterNetworkPolicy"]
            assert inf.served is False and rec.objects("ClusterNetworkPolicy") == {}
            # Several re-checks later: still one log line, one empty Replace, no error.
            checks0 = inf.list_pages
            wait_for(lambda: inf.watch_restarts == 0 and len(_events(logs, "kube_resource_not_served")) == 1
                     and rec.in_sync == 1, 10, "steady not-served state")
            time.sleep(2.0)
            assert len(_events(logs, "kube_resource_not_served")) == 1
            assert [e for e in rec.errors if e.kind == "ClusterNetworkPolicy"] == []
            replaces = [e for e in rec.events if isinstance(e, Replace) and e.kind == "ClusterNetworkPolicy"]
            assert len(replaces) == 1 and replaces[0].objects == {}
            assert rec.in_sync == 1 and inf.watch_restarts == 0
            assert inf.list_pages == checks0, "a 404 is not a listed page"

            # The CRD appears: picked up without a restart.
            install_crd(cluster)
            wait_for(lambda: inf.served is True and inf.watching, 30, "CRD picked up")
            assert len(_events(logs, "kube_resource_served")) == 1
            pol = cnp(name, "Admin", 10, {"namespaces": {"matchLabels": {"team": "a"}}},
                      ingress=[{"name": "deny-b", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": "b"}}}],
                                "protocols": [{"tcp": {"destinationPort": {"range": {"start": 8000, "end": 8080}}}}]}])
            kubectl_apply(cluster, pol)
            got = wait_for(lambda: rec.objects("ClusterNetworkPolicy").get(name), 30, "created policy")
            assert got.tier is CNPTier.ADMIN and got.priority == 10
            assert got.subject_namespaces.match_labels == {"team": "a"}
            [rule] = got.ingress
            assert rule.name == "deny-b" and rule.action is CNPAction.DENY
            assert (rule.ports[0].start, rule.ports[0].end) == (8000, 8080)

            # Update: tier, priority and action change.
            pol["spec"].update(tier="Baseline", priority=500)
            pol["spec"]["ingress"][0]["action"] = "Pass"
            kubectl_apply(cluster, pol)
            got = wait_for(lambda: (p := rec.objects("ClusterNetworkPolicy").get(name)) and p.priority == 500 and p,
                           30, "updated policy")
            assert got.tier is CNPTier.BASELINE and got.ingress[0].action is CNPAction.PASS

            cluster.kubectl("delete", "clusternetworkpolicy", name)
            wait_for(lambda: name not in rec.objects("ClusterNetworkPolicy"), 30, "deleted policy")

            # Removing the CRD with a policy in it: the kind empties, "not served" again (once).
            kubectl_apply(cluster, pol)
            wait_for(lambda: name in rec.objects("ClusterNetworkPolicy"), 30, "policy again")
            remove_crd(cluster)
            wait_for(lambda: inf.served is False and rec.objects("ClusterNetworkPolicy") == {}, 60,
                     "kind emptied after CRD removal")
            time.sleep(1.0)
            assert len(_events(logs, "kube_resource_not_served")) == 2
            assert src.synced.is_set()
            assert rec.objects("Namespace"), "the other kinds keep working"
        finally:
            src.close()
            if not crd_installed(cluster):
                install_crd(cluster)  # later tests of the session expect it


def test_nodes_arrive_as_labels_and_addresses(cluster):
    from kubernetes import client

    api = cluster.api_client()
    core = client.CoreV1Api(api)
    name = f"pa-node-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    rec = Recorder()
    src = KubeSource(rec, api, kinds=("Node",), options=FAST).start()
    try:
        assert src.wait_synced(60)
        core.create_node({"metadata": {"name": name, "labels": {"role": "edge"}}})
        core.patch_node_status(name, {"status": {"addresses": [
            {"type": "InternalIP", "address": "10.233.96.10"},
            {"type": "InternalIP", "address": "fd00:233::96:10"},
            {"type": "Hostname", "address": name},
        ], "capacity": {"pods": "110"}}})
        node = wait_for(lambda: (n := rec.objects("Node").get(name)) and n.addresses and n, 30, "node with addresses")
        assert [str(a) for a in node.addresses] == ["10.233.96.10", "fd00:233::96:10"]
        assert dict(node.labels) == {"role": "edge"}
        # The model value is all that is cached: no capacity, conditions or images.
        assert set(type(node).__dataclass_fields__) == {"name", "labels", "addresses", "resource_version"}

        events_before = len(rec.events)
        core.patch_node_status(name, {"status": {"capacity": {"pods": "111"}}})  # not in the model
        core.patch_node(name, {"metadata": {"labels": {"role": "core"}}})
        wait_for(lambda: rec.objects("Node")[name].labels.get("role") == "core", 30, "label change")
        # Only the label change was emitted, not the capacity change.
        assert len(rec.events) == events_before + 1
        core.delete_node(name)
        wait_for(lambda: name not in rec.objects("Node"), 30, "node deleted")
    finally:
        src.close()
        try:
            core.delete_node(name)
        except Exception:  # noqa: BLE001 - best effort: already gone, or the server is down
            pass
