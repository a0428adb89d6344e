"""Pod addresses checked at the edge (issue 10, items 1 and 2).

Every source of a pod address (status.podIPs, status.podIP, the pod-ips
annotation when trusted, this node's CNI endpoint record) passes the same
check; a refused address is left out of the pod, which keeps its labels and
its other addresses, and is reported once (log, error history, metric).
"""

from __future__ import annotations

import ipaddress

import pytest
from structlog.testing import capture_logs

from policy_agent import config as config_mod
from policy_agent.agent import Agent
from policy_agent.compiler.options import NodeConfig
from policy_agent.model import ModelError, PodIPPolicy, RejectedIP, load_yaml_keep_going, parse_pod
from policy_agent.model.parse import check_pod_ip
from policy_agent.model.types import POD_IP_REJECT_REASONS
from policy_agent.shared.endpoint import EndpointRecord
from policy_agent.sources.events import Replace, Upsert
from policy_agent.store import Store

ip = ipaddress.ip_address
net = ipaddress.ip_network
ANN = "vpc.amazonaws.com/pod-ips"
ANN_PATH = f"metadata.annotations[{ANN}]"
LAB = (net("10.233.0.0/16"), net("fd00:233::/64"))
TRUSTING = PodIPPolicy(LAB, trust_annotation=True)

# (address, reason): every always-invalid class, both families, and mapped IPv6 pointing at them.
ALWAYS_BAD = [
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("169.254.1.1", "link_local"),
    ("169.254.169.254", "link_local"),
    ("fe80::1", "link_local"),
    ("febf::1", "link_local"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:224.0.0.1", "multicast"),
    ("::ffff:169.254.1.1", "link_local"),
]


def pod(status=None, annotation: str | None = None, labels=None) -> dict:
    d = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "tenant", "labels": labels or {"app": "p"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"containerPort": 80, "name": "web"}]}]},
        "status": {"phase": "Running", **(status or {})},
    }
    if annotation is not None:
        d["metadata"]["annotations"] = {ANN: annotation}
    return d


def by_field(field: str, address: str) -> tuple[dict, PodIPPolicy]:
    if field == "podIPs":
        return pod({"podIPs": [{"ip": address}]}), PodIPPolicy()
    if field == "podIP":
        return pod({"podIP": address}), PodIPPolicy()
    return pod(annotation=address), TRUSTING


FIELD_PATH = {"podIPs": "status.podIPs[0].ip", "podIP": "status.podIP", "annotation": ANN_PATH}


@pytest.mark.parametrize("field", ["podIPs", "podIP", "annotation"])
@pytest.mark.parametrize("address,reason", ALWAYS_BAD)
def test_always_invalid_classes_are_left_out_on_every_field(field, address, reason):
    d, policy = by_field(field, address)
    p = parse_pod(d, policy)
    assert p.ips == ()  # in no peer set: as a pod with no IP yet
    assert p.rejected_ips == (RejectedIP(FIELD_PATH[field], address, reason),)
    # The pod itself survives, with its labels and ports: policies still select it.
    assert p.key == ("tenant", "p") and dict(p.labels) == {"app": "p"} and p.named_port("web")


@pytest.mark.parametrize("field", ["podIPs", "podIP", "annotation"])
@pytest.mark.parametrize("address", ["10.99.0.1", "192.168.1.1", "8.8.8.8", "fd00:99::1", "::ffff:10.99.0.1"])
def test_outside_pod_networks_left_out_when_networks_are_set(field, address):
    d, policy = by_field(field, address)
    if field != "annotation":
        policy = PodIPPolicy(LAB)
        want = ip(address)
        want = getattr(want, "ipv4_mapped", None) or want
        assert parse_pod(d).ips == (want,)  # no range: accepted
    p = parse_pod(d, policy)
    assert p.ips == () and p.rejected_ips == (RejectedIP(FIELD_PATH[field], address, "outside_pod_networks"),)


def test_one_bad_address_does_not_cost_the_pod_its_good_ones():
    d = pod({"podIPs": [{"ip": "0.0.0.0"}, {"ip": "10.233.1.2"}, {"ip": "fe80::1"}, {"ip": "fd00:233::5"}]})
    p = parse_pod(d, PodIPPolicy(LAB))
    assert p.ips == (ip("10.233.1.2"), ip("fd00:233::5"))
    assert [(r.path, r.reason) for r in p.rejected_ips] == [
        ("status.podIPs[0].ip", "unspecified"), ("status.podIPs[2].ip", "link_local")]


def test_ipv4_mapped_ipv6_is_normalised_to_ipv4_then_checked():
    p = parse_pod(pod({"podIPs": [{"ip": "::ffff:10.233.0.5"}, {"ip": "10.233.0.5"}]}), PodIPPolicy(LAB))
    assert p.ips == (ip("10.233.0.5"),) and p.ips[0].version == 4 and not p.rejected_ips
    # Mapped into a v4 network: the v4 range applies, not the v6 one.
    assert parse_pod(pod({"podIP": "::ffff:10.233.9.9"}), PodIPPolicy(LAB)).ips == (ip("10.233.9.9"),)


def test_ipv6_needs_a_v6_network_when_networks_are_set():
    d = pod({"podIPs": [{"ip": "10.233.0.5"}, {"ip": "fd00:233::5"}]})
    p = parse_pod(d, PodIPPolicy((net("10.233.0.0/16"),)))
    assert p.ips == (ip("10.233.0.5"),)
    assert p.rejected_ips == (RejectedIP("status.podIPs[1].ip", "fd00:233::5", "outside_pod_networks"),)


def test_annotation_never_read_when_trust_is_off():
    for text in ("10.233.0.7", "0.0.0.0", "nope", "::"):
        for policy in (PodIPPolicy(), PodIPPolicy(LAB)):
            p = parse_pod(pod(annotation=text), policy)
            assert p.ips == () and p.rejected_ips == ()  # not taken, not even reported


def test_annotation_when_trusted_is_limited_to_pod_networks():
    p = parse_pod(pod(annotation="10.233.0.7, 10.99.0.1,0.0.0.0 ,nope, fd00:233::7"), TRUSTING)
    assert p.ips == (ip("10.233.0.7"), ip("fd00:233::7"))
    assert {(r.address, r.reason) for r in p.rejected_ips} == {
        ("10.99.0.1", "outside_pod_networks"), ("0.0.0.0", "unspecified"), ("nope", "invalid")}
    assert all(r.path == ANN_PATH for r in p.rejected_ips)


def test_annotation_with_a_zone_index_is_invalid():
    p = parse_pod(pod(annotation="fd00:233::7%eth0"), TRUSTING)
    assert p.ips == () and p.rejected_ips == (RejectedIP(ANN_PATH, "fd00:233::7%eth0", "invalid"),)


def test_annotation_not_read_while_status_names_an_address_even_a_rejected_one():
    # The tenant may not replace what the kubelet wrote, even if that was refused.
    p = parse_pod(pod({"podIP": "0.0.0.0"}, annotation="10.233.0.7"), TRUSTING)
    assert p.ips == () and [r.path for r in p.rejected_ips] == ["status.podIP"]
    p = parse_pod(pod({"podIPs": [{"ip": "10.233.0.8"}]}, annotation="10.233.0.7"), TRUSTING)
    assert p.ips == (ip("10.233.0.8"),) and not p.rejected_ips


def test_unparseable_status_address_is_still_an_error_naming_the_field():
    for status, path in (({"podIPs": [{"ip": "10.0.0.300"}]}, "status.podIPs[0].ip"),
                         ({"podIP": "fd00::1%eth0"}, "status.podIP"),
                         ({"podIPs": [{"ip": 7}]}, "status.podIPs[0].ip"),
                         ({"podIPs": [None]}, "status.podIPs[0].ip")):
        with pytest.raises(ModelError) as ei:
            parse_pod(pod(status))
        assert ei.value.field_path == path and ei.value.ref == "tenant/p"


def test_pod_ip_policy_needs_networks_to_trust_the_annotation():
    with pytest.raises(ValueError, match="needs pod networks"):
        PodIPPolicy((), trust_annotation=True)


def test_accepted_memo_is_per_policy():
    open_policy, lab_policy = PodIPPolicy(), PodIPPolicy(LAB)
    assert check_pod_ip("10.99.0.1", open_policy)[0] == ip("10.99.0.1")
    assert check_pod_ip("10.99.0.1", lab_policy) == (None, "outside_pod_networks", "10.99.0.1")
    assert check_pod_ip("10.99.0.1", open_policy)[0] == ip("10.99.0.1")  # memo hit, same answer
    assert PodIPPolicy(LAB) == lab_policy and hash(PodIPPolicy(LAB)) == hash(lab_policy)


def test_reasons_are_a_bounded_set():
    seen = {reason for _, reason in ALWAYS_BAD} | {"outside_pod_networks", "invalid"}
    assert seen == set(POD_IP_REJECT_REASONS)


def test_manifest_path_parses_pods_under_the_given_policy():
    text = """\
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: tenant, annotations: {vpc.amazonaws.com/pod-ips: "0.0.0.0,10.233.0.7"}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: q, namespace: tenant}
spec: {containers: [{name: c}]}
status: {podIPs: [{ip: 10.99.0.1}]}
"""
    objs, errs = load_yaml_keep_going(text, "f.yaml")
    assert not errs and [o.ips for o in objs] == [(), (ip("10.99.0.1"),)]  # default: no annotation, no range
    objs, errs = load_yaml_keep_going(text, "f.yaml", pod_ip_policy=TRUSTING)
    assert not errs
    assert objs[0].ips == (ip("10.233.0.7"),)
    assert objs[0].rejected_ips == (RejectedIP(ANN_PATH, "0.0.0.0", "unspecified"),)
    assert objs[1].ips == () and objs[1].rejected_ips[0].reason == "outside_pod_networks"
    assert load_yaml_keep_going(text, "f.yaml")[0][1].ips == (ip("10.99.0.1"),)  # only where passed


def test_kube_source_binds_the_configured_policy_to_pod_parsing():
    from policy_agent.sources.kube import KubeSource

    src = KubeSource(lambda e: None, api_client=object(), pod_ip_policy=TRUSTING)
    p = src.informers["Pod"].res.parse(pod(annotation="10.233.0.7,127.0.0.1"))
    assert p.ips == (ip("10.233.0.7"),) and p.rejected_ips[0].reason == "loopback"
    default = KubeSource(lambda e: None, api_client=object())
    assert default.informers["Pod"].res.parse(pod(annotation="10.233.0.7")).ips == ()


# --- settings -------------------------------------------------------------------------


def _load(**flags):
    return config_mod.load({"node": "n1", "manifests": "/", **flags}, env={})


def test_settings_default_to_no_range_and_no_trust():
    cfg = _load()
    assert cfg.pod_networks == "" and cfg.trust_pod_ips_annotation is False
    assert cfg.pod_ip_policy() == PodIPPolicy()


def test_settings_build_the_policy_from_flags_and_environment():
    cfg = _load(pod_networks=" 10.233.0.0/16, fd00:233::/64 ,", trust_pod_ips_annotation=True)
    assert cfg.pod_ip_policy() == TRUSTING
    env = {"POLICY_AGENT_POD_NETWORKS": "10.233.0.0/16", "POLICY_AGENT_TRUST_POD_IPS_ANNOTATION": "true"}
    cfg = config_mod.load({"node": "n1", "manifests": "/"}, env=env)
    assert cfg.pod_ip_policy() == PodIPPolicy((net("10.233.0.0/16"),), True)


@pytest.mark.parametrize("value,words", [
    ("10.233.0.0", "is not a CIDR"),
    ("10.233.0.1/16", "host bits set"),
    ("10.233.0.0/16,banana/3", "'banana/3' is not a valid CIDR"),
    ("10.233.0.0/33", "not a valid CIDR"),
])
def test_bad_pod_networks_are_refused_naming_the_setting(value, words):
    with pytest.raises(config_mod.ConfigError) as ei:
        _load(pod_networks=value)
    assert "pod_networks" in str(ei.value) and "--pod-networks" in str(ei.value) and words in str(ei.value)


def test_trust_without_pod_networks_is_refused():
    with pytest.raises(config_mod.ConfigError) as ei:
        _load(trust_pod_ips_annotation=True)
    msg = str(ei.value)
    assert "trust_pod_ips_annotation" in msg and "needs pod_networks" in msg


# --- the store: CNI records, reporting ---------------------------------------------------


def _api_pod(ips=(), annotation=None, policy=PodIPPolicy()):
    status = {"podIPs": [{"ip": i} for i in ips]} if ips else {}
    return parse_pod(pod(status, annotation), policy)


def test_cni_record_with_a_bad_address_is_filtered_and_reported():
    seen: list[str] = []
    s = Store("n1", PodIPPolicy(LAB), on_pod_ip_rejected=seen.append)
    p = _api_pod()
    s.apply(Upsert("kube", "Pod", p.key, p))
    rec = EndpointRecord("tenant", "p", "c1", "enix", ("0.0.0.0/32", "10.233.0.9/32", "192.168.0.1", "nope"))
    s.apply(Upsert("cni", "Endpoint", p.key, rec))
    with capture_logs() as logs:
        eff = s.take_changes().pods[p.key]
    assert eff.ips == (ip("10.233.0.9"),) and dict(eff.labels) == {"app": "p"}
    assert {(r.path, r.reason) for r in eff.rejected_ips} == {
        ("endpoint record.ips[0]", "unspecified"), ("endpoint record.ips[2]", "outside_pod_networks"),
        ("endpoint record.ips[3]", "invalid")}
    assert sorted(seen) == ["invalid", "outside_pod_networks", "unspecified"]
    warned = [e for e in logs if e["event"] == "pod_ip_rejected"]
    assert {(e["pod"], e["field"], e["address"], e["reason"]) for e in warned} >= {
        ("tenant/p", "endpoint record.ips[0]", "0.0.0.0", "unspecified")}
    assert all(e["log_level"] == "warning" and e["source"] == "endpoint-record" for e in warned)
    assert s.error_count == 3 and all(e["key"] == "tenant/p" and e["kind"] == "Pod" for e in s.errors)
    assert any("endpoint record.ips[0]: address '0.0.0.0' rejected (unspecified)" in e["message"] for e in s.errors)


def test_cni_record_with_only_bad_addresses_leaves_the_api_view():
    s = Store("n1", PodIPPolicy())
    p = _api_pod(["10.233.0.4"])
    s.apply(Upsert("kube", "Pod", p.key, p))
    s.apply(Upsert("cni", "Endpoint", p.key, EndpointRecord("tenant", "p", "c1", "enix", ("127.0.0.1/32",))))
    eff = s.take_changes().pods[p.key]
    assert eff.ips == (ip("10.233.0.4"),) and eff.rejected_ips[0].reason == "loopback"


def test_each_rejection_is_reported_once_until_it_changes():
    seen: list[str] = []
    s = Store("n1", TRUSTING, on_pod_ip_rejected=seen.append)
    bad = _api_pod(annotation="0.0.0.0", policy=TRUSTING)
    s.apply(Replace("kube", "Pod", {bad.key: bad}))
    s.take_changes()
    for _ in range(3):  # relists of the same object, and a resync recomputing the pod
        s.apply(Replace("kube", "Pod", {bad.key: bad}))
        s._dirty["Pod"].add(bad.key)
        s.take_changes()
    assert seen == ["unspecified"] and s.error_count == 1
    worse = _api_pod(annotation="0.0.0.0,127.0.0.1", policy=TRUSTING)
    s.apply(Upsert("kube", "Pod", worse.key, worse))
    s.take_changes()
    assert seen == ["unspecified", "loopback"]  # only the new one
    fixed = _api_pod(annotation="10.233.0.7", policy=TRUSTING)
    s.apply(Upsert("kube", "Pod", fixed.key, fixed))
    assert s.take_changes().pods[fixed.key].ips == (ip("10.233.0.7"),)
    s.apply(Upsert("kube", "Pod", bad.key, bad))
    s.take_changes()
    assert seen == ["unspecified", "loopback", "unspecified"]  # changed back: reported again


def test_agent_counts_rejections_by_reason_only():
    agent = Agent(NodeConfig("n1"), dataplane=None, sources=[], pod_ip_policy=PodIPPolicy(LAB), gc_freeze=False)
    for name, address in (("a", "0.0.0.0"), ("b", "10.99.0.1"), ("c", "::")):
        d = pod({"podIP": address})
        d["metadata"]["name"] = name
        p = parse_pod(d, PodIPPolicy(LAB))
        agent.store.apply(Upsert("kube", "Pod", p.key, p))
    agent.store.take_changes()
    text = agent.metrics.render().decode()
    assert 'policy_agent_pod_ip_rejected_total{reason="unspecified"} 2.0' in text
    assert 'policy_agent_pod_ip_rejected_total{reason="outside_pod_networks"} 1.0' in text
    assert "tenant" not in "\n".join(ln for ln in text.splitlines() if "pod_ip_rejected" in ln)
