"""The store: per-source slices, priority merge, endpoint-record merge, effective-change tracking."""

from __future__ import annotations

import ipaddress

from agent_helpers import make_pod

from policy_agent.shared.endpoint import EndpointRecord
from policy_agent.sources.events import Delete, InSync, Replace, SourceError, Upsert
from policy_agent.store import Store


def test_replace_removes_what_the_source_no_longer_has():
    s = Store("n1")
    a, b = make_pod("x", "a", ["10.233.0.1"]), make_pod("x", "b", ["10.233.0.2"])
    s.apply(Replace("kube", "Pod", {a.key: a, b.key: b}))
    assert set(s.take_changes().pods) == {a.key, b.key}
    s.apply(Replace("kube", "Pod", {a.key: a}))
    ch = s.take_changes()
    assert ch.pods == {b.key: None}
    s.apply(Replace("kube", "Pod", {a.key: a}))
    assert not s.take_changes()  # nothing new: no change at all


def test_api_server_wins_over_manifests_and_falls_back():
    s = Store("n1")
    api = make_pod("x", "a", ["10.233.0.1"], labels={"v": "api"})
    man = make_pod("x", "a", ["10.233.0.1"], labels={"v": "file"})
    s.apply(Upsert("manifests:/d", "Pod", api.key, man))
    s.apply(Upsert("kube", "Pod", api.key, api))
    assert s.take_changes().pods[api.key].labels["v"] == "api"
    s.apply(Delete("kube", "Pod", api.key))
    assert s.take_changes().pods[api.key].labels["v"] == "file"


def test_endpoint_record_fills_ips_until_the_api_reports_them():
    s = Store("n1")
    pod = make_pod("x", "a", ips=(), node=None)
    s.apply(Upsert("kube", "Pod", pod.key, pod))
    s.apply(Upsert("cni", "Endpoint", pod.key, EndpointRecord("x", "a", "c1", "enix", ("10.233.0.9",))))
    eff = s.take_changes().pods[pod.key]
    assert eff.ips == (ipaddress.ip_address("10.233.0.9"),) and eff.node_name == "n1"
    assert s.endpoint("x", "a").container_id == "c1"
    # The API reports the IP: same effective pod apart from node name, which stays ours.
    s.apply(Upsert("kube", "Pod", pod.key, make_pod("x", "a", ["10.233.0.9"], node="n1")))
    assert not s.take_changes().pods
    # The record goes away (CNI DEL): the API's view remains.
    s.apply(Delete("cni", "Endpoint", pod.key))
    ch = s.take_changes()
    assert ch.endpoints == {pod.key: None} and not ch.pods


def test_sync_and_errors_are_tracked():
    s = Store("n1")
    s.apply(InSync("kube"))
    s.apply(InSync("kube"))
    s.apply(SourceError("kube", "bad", "Pod", ("x", "a")))
    assert s.in_sync_sources == {"kube"} and s.sync_counts["kube"] == 2
    assert s.errors[-1] == {"source": "kube", "kind": "Pod", "key": "x/a", "message": "bad"}


def test_endpoint_record_ips_are_authoritative_for_a_local_pod():
    from structlog.testing import capture_logs

    s = Store("n1")
    pod = make_pod("x", "a", ["10.233.0.1"])  # stale: the sandbox was recreated with .9
    s.apply(Upsert("kube", "Pod", pod.key, pod))
    assert s.take_changes().pods[pod.key].ips == (ipaddress.ip_address("10.233.0.1"),)
    rec = EndpointRecord("x", "a", "c2", "enix", ("10.233.0.9/32",))
    with capture_logs() as logs:
        s.apply(Upsert("cni", "Endpoint", pod.key, rec))
        assert s.take_changes().pods[pod.key].ips == (ipaddress.ip_address("10.233.0.9"),)
        # Other pod updates with the same stale status: still the record's IP, logged once.
        s.apply(Upsert("kube", "Pod", pod.key, make_pod("x", "a", ["10.233.0.1"], labels={"v": "2"})))
        assert s.take_changes().pods[pod.key].ips == (ipaddress.ip_address("10.233.0.9"),)
    mismatches = [e for e in logs if e["event"] == "endpoint_ip_mismatch"]
    assert len(mismatches) == 1
    assert mismatches[0]["record_ips"] == ["10.233.0.9"] and mismatches[0]["api_ips"] == ["10.233.0.1"]
    # CNI DEL: the API's IPs apply again.
    s.apply(Delete("cni", "Endpoint", pod.key))
    assert s.take_changes().pods[pod.key].ips == (ipaddress.ip_address("10.233.0.1"),)


def test_endpoint_record_is_ignored_for_a_pod_on_another_node():
    s = Store("n1")
    pod = make_pod("x", "a", ["10.233.5.1"], node="n2")  # same name, now runs elsewhere
    s.apply(Upsert("cni", "Endpoint", pod.key, EndpointRecord("x", "a", "old", "enix", ("10.233.0.9",))))
    s.apply(Upsert("kube", "Pod", pod.key, pod))
    eff = s.take_changes().pods[pod.key]
    assert eff.ips == (ipaddress.ip_address("10.233.5.1"),) and eff.node_name == "n2"


def test_apply_says_whether_the_store_changed():
    s = Store("n1")
    pod = make_pod("x", "a", ["10.233.0.1"])
    assert s.apply(Upsert("kube", "Pod", pod.key, pod)) is True
    assert s.apply(Upsert("kube", "Pod", pod.key, pod)) is False
    assert s.apply(Replace("kube", "Pod", {pod.key: pod})) is False
    assert s.apply(InSync("kube")) is False
    assert s.apply(Delete("kube", "Pod", pod.key)) is True
    assert s.apply(Delete("kube", "Pod", pod.key)) is False
