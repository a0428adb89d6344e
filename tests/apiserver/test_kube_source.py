"""The Kubernetes source against a real kube-apiserver: list, watch, conversion, faults.

Every test ends with the convergence check: the informer caches and the events the
agent would have applied both equal a fresh list from the server (same keys, same
resourceVersions) - nothing missed, nothing stale.
"""

from __future__ import annotations

import ipaddress
import os
import uuid

import pytest
from kube_helpers import (
    Recorder,
    apply,
    namespace_yaml,
    pod_yaml,
    policy_yaml,
    set_pod_ips,
    wait_converged,
    wait_for,
)

from policy_agent.model.types import NetworkPolicy, Pod, PodIPPolicy, RejectedIP
from policy_agent.sources.events import InSync, Replace, Upsert
from policy_agent.sources.kube import KubeSource, WatchOptions

# The first test may build kube-apiserver (minutes on a fresh machine).
pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(2400)]

# Short server-side watch timeouts so a stall is detected in seconds, not minutes.
FAST = WatchOptions(watch_timeout_min=4, read_grace=3, backoff_initial=0.2, backoff_max=2, list_read_timeout=20)


def _ns(tag: str) -> str:
    return f"pa-kube-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def source_via_proxy(cluster, proxy, recorder):
    src = KubeSource(recorder, cluster.api_client(host=proxy.url), options=FAST).start()
    yield src
    src.close()


def test_list_then_watch_delivers_pods_with_ips(cluster, recorder):
    ns = _ns("basic")
    apply(cluster, namespace_yaml(ns, {"team": "a"}))
    apply(cluster, pod_yaml(ns, "before", {"app": "web"}), policy_yaml(ns, "allow-web"))
    api = cluster.api_client()
    src = KubeSource(recorder, api).start()
    try:
        assert src.wait_synced(60), "no InSync after the initial lists"
        with recorder.lock:
            # One Replace per kind, then InSync (errors about bad objects may interleave).
            seq = [e for e in recorder.events if isinstance(e, (Replace, InSync))]
            n = len(src.informers)
            assert [type(e) for e in seq[:n + 1]] == [Replace] * n + [InSync]
            assert sorted(e.kind for e in seq[:n]) == sorted(src.informers)
        assert (ns, "before") in src.cache("Pod")
        assert src.cache("NetworkPolicy")[(ns, "allow-web")].pod_selector.match_labels == {"app": "web"}
        assert src.cache("Namespace")[ns].labels["team"] == "a"

        # Watch: a new pod, then the kubelet writes its IPs through the status subresource.
        apply(cluster, pod_yaml(ns, "after", {"app": "web"}, node="node-b"))
        set_pod_ips(api, ns, "after", "10.233.1.7", "fd00:233::7")
        pod = wait_for(
            lambda: (p := recorder.objects("Pod").get((ns, "after"))) is not None and p.ips and p,
            60,
            "pod IPs via watch",
        )
        assert isinstance(pod, Pod)
        assert pod.node_name == "node-b"
        assert pod.ips == (ipaddress.ip_address("10.233.1.7"), ipaddress.ip_address("fd00:233::7"))
        assert pod.phase == "Running"

        # Label change and deletes, with kubectl as an operator does it.
        cluster.kubectl("label", "pod", "-n", ns, "before", "app=db", "--overwrite")
        cluster.kubectl("delete", "networkpolicy", "-n", ns, "allow-web")
        wait_for(lambda: recorder.objects("Pod")[(ns, "before")].labels.get("app") == "db", 60, "label change")
        wait_for(lambda: (ns, "allow-web") not in recorder.objects("NetworkPolicy"), 60, "policy delete")
        wait_converged(cluster, src, recorder)
        assert src.watch_restarts == 0
    finally:
        src.close()


def test_status_only_changes_emit_nothing(cluster, recorder):
    """Conditions the model does not hold (a kubelet heartbeat) cost the agent nothing."""
    ns = _ns("quiet")
    apply(cluster, namespace_yaml(ns), pod_yaml(ns, "p", {"app": "x"}))
    api = cluster.api_client()
    set_pod_ips(api, ns, "p", "10.233.1.9")
    src = KubeSource(recorder, api).start()
    try:
        assert src.wait_synced(60)
        n = len(recorder.events)
        from kubernetes import client

        client.CoreV1Api(api).patch_namespaced_pod_status(
            "p", ns, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        )
        # The change reaches the cache (new resourceVersion) but produces no event.
        wait_for(
            lambda: src.cache("Pod")[(ns, "p")].resource_version != recorder.objects("Pod")[(ns, "p")].resource_version,
            60,
            "status-only update in the cache",
        )
        with recorder.lock:
            assert not [e for e in recorder.events[n:] if isinstance(e, Upsert) and e.key == (ns, "p")]
    finally:
        src.close()


def test_pod_ips_annotation_is_checked_at_the_edge_never_fatal(cluster, recorder):
    """The API server accepts any pod-ips annotation (a tenant with "edit" writes it).
    Trusted and limited to the pod networks, a bad value is left out and recorded on
    the pod (the store reports it); the pod itself, its labels and other pods flow on.
    Untrusted (the default) it is not read at all: tests/unit/test_pod_ip_validation.py."""
    ns = _ns("podips")
    apply(cluster, namespace_yaml(ns), pod_yaml(ns, "good", {"app": "a"}), pod_yaml(ns, "flaky", {"app": "b"}))
    policy = PodIPPolicy((ipaddress.ip_network("10.233.0.0/16"),), trust_annotation=True)
    src = KubeSource(recorder, cluster.api_client(), pod_ip_policy=policy).start()
    ann = "metadata.annotations[vpc.amazonaws.com/pod-ips]"
    try:
        assert src.wait_synced(60)
        assert (ns, "flaky") in src.cache("Pod")
        cases = (("not-an-ip", "invalid"), ("0.0.0.0", "unspecified"), ("10.99.0.1", "outside_pod_networks"))
        for value, reason in cases:
            cluster.kubectl("annotate", "pod", "-n", ns, "flaky", f"vpc.amazonaws.com/pod-ips={value}", "--overwrite")
            wait_for(
                lambda value=value, reason=reason: recorder.objects("Pod")[(ns, "flaky")].rejected_ips
                == (RejectedIP(ann, value, reason),),
                60,
                f"annotation {value} rejected as {reason}",
            )
            p = recorder.objects("Pod")[(ns, "flaky")]
            assert p.ips == () and p.labels["app"] == "b"  # the pod stays, with its labels
        assert not [e for e in recorder.errors if e.key == (ns, "flaky")]  # no error of the object
        assert src.informers["Pod"].bad_objects == 0
        cluster.kubectl("label", "pod", "-n", ns, "good", "app=c", "--overwrite")
        wait_for(lambda: recorder.objects("Pod")[(ns, "good")].labels["app"] == "c", 60, "other pod update")
        cluster.kubectl("annotate", "pod", "-n", ns, "flaky", "vpc.amazonaws.com/pod-ips=10.233.4.4", "--overwrite")
        wait_for(
            lambda: recorder.objects("Pod")[(ns, "flaky")].ips == (ipaddress.ip_address("10.233.4.4"),),
            60,
            "address in the pod networks taken",
        )
        assert recorder.objects("Pod")[(ns, "flaky")].rejected_ips == ()
    finally:
        src.close()


def test_paginated_list(cluster, recorder):
    ns = _ns("pages")
    apply(cluster, namespace_yaml(ns), *[policy_yaml(ns, f"p{i:02d}", port=1000 + i) for i in range(25)])
    src = KubeSource(
        recorder, cluster.api_client(), kinds=("NetworkPolicy",), options=WatchOptions(page_size=7)
    ).start()
    try:
        assert src.wait_synced(60)
        pols = {k: v for k, v in src.cache("NetworkPolicy").items() if k[0] == ns}
        assert len(pols) == 25 and all(isinstance(p, NetworkPolicy) for p in pols.values())
        assert pols[(ns, "p13")].ingress[0].ports[0].port == 1013
        assert src.informers["NetworkPolicy"].list_pages >= 4  # 25+ objects, 7 a page
        wait_converged(cluster, src, recorder, kinds=("NetworkPolicy",))
    finally:
        src.close()


def test_dropped_connections_mid_watch(cluster, proxy, source_via_proxy, recorder):
    src = source_via_proxy
    ns = _ns("drop")
    assert src.wait_synced(60)
    apply(cluster, namespace_yaml(ns), pod_yaml(ns, "a", {"app": "web"}))
    wait_for(lambda: (ns, "a") in recorder.objects("Pod"), 60, "pod a")
    for i in range(3):
        # (A ClusterNetworkPolicy informer without the CRD has nothing to watch.)
        wait_for(lambda: all(inf.watching or inf.served is False for inf in src.informers.values()), 60,
                 "all informers watching")
        before = src.watch_restarts
        assert proxy.drop() >= 3, "no watch connection to drop"
        # Changes made right after the drop must not be missed.
        apply(cluster, pod_yaml(ns, f"d{i}", {"app": "web"}))
        cluster.kubectl("label", "pod", "-n", ns, "a", f"round=r{i}", "--overwrite")
        wait_for(lambda b=before: src.watch_restarts > b, 60, "watch restart counted")
    cluster.kubectl("delete", "pod", "-n", ns, "d0", "--grace-period=0", "--force")
    wait_converged(cluster, src, recorder)
    assert recorder.objects("Pod")[(ns, "a")].labels["round"] == "r2"
    assert (ns, "d0") not in recorder.objects("Pod") and (ns, "d2") in recorder.objects("Pod")


def test_stalled_connection_detected_and_resumed(cluster, proxy, source_via_proxy, recorder):
    src = source_via_proxy
    ns = _ns("stall")
    assert src.wait_synced(60)
    restarts = src.watch_restarts
    proxy.stall()
    try:
        apply(cluster, namespace_yaml(ns), pod_yaml(ns, "s", {"app": "web"}), policy_yaml(ns, "pol"))
        # No byte moves: only the client read timeout can notice.
        wait_for(lambda: src.watch_restarts > restarts, 60, "stall detected by the read timeout")
    finally:
        proxy.resume()
    wait_converged(cluster, src, recorder)
    assert (ns, "s") in recorder.objects("Pod") and (ns, "pol") in recorder.objects("NetworkPolicy")


def test_slow_server(cluster, proxy, source_via_proxy, recorder):
    src = source_via_proxy
    proxy.delay = 0.05
    ns = _ns("slow")
    assert src.wait_synced(120)
    apply(cluster, namespace_yaml(ns), *[pod_yaml(ns, f"p{i}", {"app": "web"}) for i in range(10)])
    for i in range(0, 10, 3):
        set_pod_ips(cluster.api_client(), ns, f"p{i}", f"10.233.2.{i + 1}")
    cluster.kubectl("delete", "pod", "-n", ns, "p9", "--grace-period=0", "--force")
    wait_converged(cluster, src, recorder, timeout=180)
    assert recorder.objects("Pod")[(ns, "p3")].ips == (ipaddress.ip_address("10.233.2.4"),)


def test_resume_from_compacted_resource_version_relists(cluster, proxy, source_via_proxy, recorder):
    if cluster.local is None:
        pytest.skip("needs the local test cluster (etcdctl compaction of its etcd)")
    src = source_via_proxy
    ns = _ns("gone")
    apply(cluster, namespace_yaml(ns), policy_yaml(ns, "stays"), policy_yaml(ns, "goes"))
    assert src.wait_synced(60)
    wait_for(lambda: (ns, "goes") in recorder.objects("NetworkPolicy"), 60, "policy seen")
    relists = src.relists
    # Cut the informer off, change things, compact etcd past its resourceVersion.
    proxy.refuse()
    proxy.drop()
    cluster.kubectl("delete", "networkpolicy", "-n", ns, "goes")
    apply(cluster, policy_yaml(ns, "new", port=8080), policy_yaml(ns, "stays", port=443))
    cluster.local.compact()
    proxy.accept()
    wait_for(lambda: src.relists > relists, 90, "410 Gone -> relist")
    wait_converged(cluster, src, recorder)
    pols = recorder.objects("NetworkPolicy")
    assert (ns, "goes") not in pols, "deleted while disconnected but still present (stale)"
    assert pols[(ns, "stays")].ingress[0].ports[0].port == 443
    assert (ns, "new") in pols
    with recorder.lock:
        assert any(isinstance(e, Replace) and e.kind == "NetworkPolicy" for e in recorder.events[-50:])


def test_apiserver_restart(cluster, proxy, source_via_proxy, recorder):
    if cluster.local is None:
        pytest.skip("needs the local test cluster (restarts its kube-apiserver)")
    src = source_via_proxy
    ns = _ns("restart")
    apply(cluster, namespace_yaml(ns), pod_yaml(ns, "r1", {"app": "web"}), policy_yaml(ns, "p1"))
    assert src.wait_synced(60)
    wait_for(lambda: (ns, "r1") in recorder.objects("Pod"), 60, "pod seen")
    restarts = src.watch_restarts
    pod_relists = src.informers["Pod"].relists
    # Changes the informer cannot see, then a restart of the server.
    proxy.refuse()
    proxy.drop()
    cluster.kubectl("delete", "pod", "-n", ns, "r1", "--grace-period=0", "--force")
    apply(cluster, pod_yaml(ns, "r2", {"app": "db"}))
    cluster.local.restart_apiserver()
    proxy.accept()
    apply(cluster, policy_yaml(ns, "p2"))
    wait_converged(cluster, src, recorder, timeout=180)
    assert src.watch_restarts > restarts
    # The restarted server's watch cache starts after our resourceVersion: 410, relist.
    assert src.informers["Pod"].relists > pod_relists
    assert (ns, "r1") not in recorder.objects("Pod")
    assert recorder.objects("Pod")[(ns, "r2")].labels["app"] == "db"


def test_stop_is_prompt_and_joins(cluster, recorder):
    src = KubeSource(recorder, cluster.api_client()).start()
    assert src.wait_synced(60)
    src.close()
    assert not any(i._thread.is_alive() for i in src.informers.values())


def test_client_from_kubeconfig_file(cluster, recorder):
    """The agent's own config path: the official client's kubeconfig loader."""
    from policy_agent.sources.kube import api_client_from_config

    src = KubeSource(recorder, api_client_from_config(kubeconfig=str(cluster.kubeconfig)), kinds=("Namespace",))
    src.start()
    try:
        assert src.wait_synced(60)
        assert "default" in src.cache("Namespace")
    finally:
        src.close()
