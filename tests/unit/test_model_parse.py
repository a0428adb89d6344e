"""policy_agent.model.parse: API dicts / YAML -> frozen values; defaults; every rejection."""

from __future__ import annotations

import copy
import ipaddress

import pytest

from policy_agent.model import (
    MATCH_ALL,
    ContainerPort,
    ModelError,
    Namespace,
    NetworkPolicy,
    Operator,
    Pod,
    PodIPPolicy,
    PolicyPort,
    PolicyType,
    Protocol,
    SourcedModelError,
    load_yaml,
    load_yaml_keep_going,
    parse_namespace,
    parse_network_policy,
    parse_object,
    parse_pod,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network


def policy(spec: dict, name: str = "web", ns: str = "prod") -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def pod(**kw) -> dict:
    d = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "a", "namespace": "x", "labels": {"app": "a"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.233.0.5"}]},
    }
    for k, v in kw.items():
        d[k] = v
    return d


def reject(parser, d, field: str, *words: str) -> ModelError:
    with pytest.raises(ModelError) as ei:
        parser(d)
    e = ei.value
    assert e.field_path == field, str(e)
    text = str(e)
    assert field in text
    for w in words:
        assert w in text, text
    return e


# --- Namespace ----------------------------------------------------------------------


def test_namespace_gets_name_label_and_keeps_others():
    ns = parse_namespace(
        {"kind": "Namespace", "metadata": {"name": "x", "labels": {"team": "a"}, "resourceVersion": "7"}}
    )
    assert ns == Namespace("x", ns.labels, "7")
    assert dict(ns.labels) == {"team": "a", "kubernetes.io/metadata.name": "x"}


def test_namespace_name_label_is_overwritten_with_the_name():
    ns = parse_namespace({"metadata": {"name": "x", "labels": {"kubernetes.io/metadata.name": "other"}}})
    assert ns.labels["kubernetes.io/metadata.name"] == "x"


@pytest.mark.parametrize("name", ["X", "a.b", "-a", "a_b", "a" * 64])
def test_namespace_name_must_be_dns_label(name):
    e = reject(parse_namespace, {"metadata": {"name": name}}, "metadata.name", "DNS-1123 label")
    assert e.kind == "Namespace"


def test_namespace_missing_name():
    reject(parse_namespace, {"metadata": {}}, "metadata.name", "required")
    reject(parse_namespace, {}, "metadata", "required")


# --- Pod ----------------------------------------------------------------------------


def test_pod_fields():
    d = pod()
    d["metadata"].update(uid="u1", resourceVersion="42")
    d["spec"]["containers"] = [
        {"name": "c", "ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 53, "protocol": "UDP"}]}
    ]
    d["spec"]["initContainers"] = [{"name": "i", "ports": [{"containerPort": 9000, "protocol": "SCTP", "name": "s"}]}]
    d["status"]["podIPs"] = [{"ip": "10.233.0.5"}, {"ip": "fd00:233::5"}]
    p = parse_pod(d)
    assert p == Pod(
        namespace="x",
        name="a",
        labels=p.labels,
        node_name="n1",
        ips=(ip("10.233.0.5"), ip("fd00:233::5")),
        ports=(
            ContainerPort(80, Protocol.TCP, "http"),
            ContainerPort(53, Protocol.UDP, None),
            ContainerPort(9000, Protocol.SCTP, "s"),
        ),
        host_network=False,
        phase="Running",
        uid="u1",
        resource_version="42",
    )
    assert dict(p.labels) == {"app": "a"}


def test_pod_ip_fallbacks():
    d = pod(status={"podIP": "10.233.0.9"})
    assert parse_pod(d).ips == (ip("10.233.0.9"),)
    d = pod(status={})
    d["metadata"]["annotations"] = {"vpc.amazonaws.com/pod-ips": "10.233.0.7"}
    trusting = PodIPPolicy((net("10.233.0.0/16"),), trust_annotation=True)
    assert parse_pod(d, trusting).ips == (ip("10.233.0.7"),)
    assert parse_pod(d).ips == ()  # not trusted by default (tests/unit/test_pod_ip_validation.py)
    # status wins over the annotation
    d["status"] = {"podIPs": [{"ip": "10.233.0.8"}]}
    assert parse_pod(d, trusting).ips == (ip("10.233.0.8"),)
    d = pod(status={})
    assert parse_pod(d).ips == ()
    d = pod(status={"podIP": "10.233.0.1", "podIPs": [{"ip": "10.233.0.1"}, {"ip": "10.233.0.1"}]})
    assert parse_pod(d).ips == (ip("10.233.0.1"),)


def test_pod_defaults_namespace_host_network_and_no_node():
    d = pod()
    del d["metadata"]["namespace"]
    d["spec"] = {"hostNetwork": True, "containers": []}
    p = parse_pod(d)
    assert p.namespace == "default" and p.host_network and p.node_name is None


def test_pod_rejections():
    bad = pod(status={"podIPs": [{"ip": "10.0.0.300"}]})
    e = reject(parse_pod, bad, "status.podIPs[0].ip", "x/a", "not a valid IP")
    assert e.kind == "Pod" and e.ref == "x/a"
    bad = pod()
    bad["spec"]["containers"] = [{"ports": [{"containerPort": 70000}]}]
    reject(parse_pod, bad, "spec.containers[0].ports[0].containerPort", "out of range")
    bad["spec"]["containers"] = [{"ports": [{"containerPort": 80, "protocol": "ICMP"}]}]
    reject(parse_pod, bad, "spec.containers[0].ports[0].protocol", "unknown protocol")
    bad["spec"]["containers"] = [{"ports": [{"containerPort": 80, "name": "HTTP"}]}]
    reject(parse_pod, bad, "spec.containers[0].ports[0].name", "IANA_SVC_NAME")
    bad = pod()
    bad["metadata"]["name"] = "A"
    reject(parse_pod, bad, "metadata.name", "subdomain")
    bad = pod()
    bad["metadata"]["namespace"] = "a.b"
    reject(parse_pod, bad, "metadata.namespace", "DNS-1123 label")
    bad = pod()
    bad["metadata"]["labels"] = {"v": 1}
    reject(parse_pod, bad, "metadata.labels[v]", "must be a string")
    bad["metadata"]["labels"] = {"-bad": "x"}
    reject(parse_pod, bad, "metadata.labels[-bad]", "label key")
    bad["metadata"]["labels"] = {"Example.com/x": "x"}
    reject(parse_pod, bad, "metadata.labels[Example.com/x]", "prefix")
    bad["metadata"]["labels"] = {"k": "bad value"}
    reject(parse_pod, bad, "metadata.labels[k]", "label value")
    bad["metadata"]["labels"] = {"k": "v" * 64}
    reject(parse_pod, bad, "metadata.labels[k]", "label value")
    # A broken pod-ips annotation is no error of the pod: tests/unit/test_pod_ip_validation.py


def test_host_network_must_be_a_boolean():
    for value in ("true", "false", 1, 0, "yes", [True]):
        bad = pod()
        bad["spec"]["hostNetwork"] = value
        e = reject(parse_pod, bad, "spec.hostNetwork", "x/a", "must be a boolean")
        assert e.kind == "Pod" and e.field_path == "spec.hostNetwork"
    for value, want in ((True, True), (False, False), (None, False)):
        d = pod()
        d["spec"]["hostNetwork"] = value
        assert parse_pod(d).host_network is want


def test_aws_annotation_is_ignored_once_status_has_ips():
    d = pod(status={"podIPs": [{"ip": "10.233.0.8"}]})
    # User-writable: a forged or broken value changes nothing while status has IPs.
    d["metadata"]["annotations"] = {"vpc.amazonaws.com/pod-ips": "10.233.0.66"}
    assert parse_pod(d).ips == (ip("10.233.0.8"),)
    d["metadata"]["annotations"] = {"vpc.amazonaws.com/pod-ips": "nope"}
    assert parse_pod(d).ips == (ip("10.233.0.8"),)
    d = pod(status={"podIP": "10.233.0.9"})
    d["metadata"]["annotations"] = {"vpc.amazonaws.com/pod-ips": "10.233.0.66"}
    assert parse_pod(d).ips == (ip("10.233.0.9"),)


def test_label_key_and_value_edge_cases_accepted():
    d = pod()
    d["metadata"]["labels"] = {"example.com/a_b.c-d": "", "x": "A.b_c-9", "k" * 63: "v" * 63}
    assert len(parse_pod(d).labels) == 3


# --- NetworkPolicy: defaults ---------------------------------------------------------


def test_policy_types_default_ingress_only():
    p = parse_network_policy(policy({"podSelector": {}}))
    assert p.policy_types == (PolicyType.INGRESS,)
    assert p.pod_selector == MATCH_ALL and p.ingress == () and p.egress == ()


def test_policy_types_default_adds_egress_when_egress_rules():
    p = parse_network_policy(policy({"podSelector": {}, "egress": [{}]}))
    assert p.policy_types == (PolicyType.INGRESS, PolicyType.EGRESS)
    assert p.egress[0].ports == () and p.egress[0].peers == ()


def test_policy_types_explicit_kept_in_canonical_order():
    p = parse_network_policy(policy({"podSelector": {}, "policyTypes": ["Egress", "Ingress", "Egress"]}))
    assert p.policy_types == (PolicyType.INGRESS, PolicyType.EGRESS)
    p = parse_network_policy(policy({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}))
    assert p.policy_types == (PolicyType.EGRESS,)


def test_port_protocol_defaults_to_tcp_and_forms():
    p = parse_network_policy(
        policy(
            {
                "ingress": [
                    {
                        "ports": [
                            {"port": 80},
                            {"port": "http", "protocol": "UDP"},
                            {"port": 1000, "endPort": 1000},
                            {"protocol": "SCTP"},
                            {},
                        ]
                    }
                ]
            }
        )
    )
    assert p.ingress[0].ports == (
        PolicyPort(Protocol.TCP, 80),
        PolicyPort(Protocol.UDP, "http"),
        PolicyPort(Protocol.TCP, 1000, 1000),
        PolicyPort(Protocol.SCTP),
        PolicyPort(Protocol.TCP),
    )


def test_selectors_and_peers():
    p = parse_network_policy(
        policy(
            {
                "podSelector": {
                    "matchLabels": {"app": "web"},
                    "matchExpressions": [
                        {"key": "tier", "operator": "NotIn", "values": ["b", "a", "b"]},
                        {"key": "env", "operator": "Exists"},
                    ],
                },
                "ingress": [
                    {
                        "from": [
                            {"podSelector": {}},
                            {"namespaceSelector": {"matchLabels": {"team": "x"}}},
                            {"podSelector": {"matchLabels": {"a": "b"}}, "namespaceSelector": {}},
                            {"ipBlock": {"cidr": "10.1.2.3/16", "except": ["10.1.3.0/24", "10.1.2.0/24"]}},
                            {"ipBlock": {"cidr": "fd00::/64"}},
                        ]
                    }
                ],
            }
        )
    )
    sel = p.pod_selector
    assert dict(sel.match_labels) == {"app": "web"}
    assert [(r.key, r.operator, r.values) for r in sel.match_expressions] == [
        ("env", Operator.EXISTS, ()),
        ("tier", Operator.NOT_IN, ("a", "b")),
    ]
    peers = p.ingress[0].peers
    assert peers[0].pod_selector == MATCH_ALL and peers[0].namespace_selector is None
    assert peers[1].pod_selector is None and dict(peers[1].namespace_selector.match_labels) == {"team": "x"}
    assert peers[2].namespace_selector == MATCH_ALL and peers[2].pod_selector is not None
    # host bits masked (documented decision); excepts sorted
    assert peers[3].ip_block.cidr == net("10.1.0.0/16")
    assert peers[3].ip_block.excepts == (net("10.1.2.0/24"), net("10.1.3.0/24"))
    assert peers[4].ip_block.family == 6


def test_equal_selectors_in_different_order_are_equal():
    a = {"matchExpressions": [{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "In", "values": ["2", "1"]}]}
    b = {"matchExpressions": [{"key": "b", "operator": "In", "values": ["1", "2"]}, {"key": "a", "operator": "Exists"}]}
    pa = parse_network_policy(policy({"podSelector": a}))
    pb = parse_network_policy(policy({"podSelector": b}))
    assert pa.pod_selector == pb.pod_selector
    assert hash(pa) == hash(pb)


# --- NetworkPolicy: rejections -------------------------------------------------------

IB = "spec.ingress[0].from[1].ipBlock"


def _ipblock_policy(block) -> dict:
    return policy({"ingress": [{"from": [{"podSelector": {}}, {"ipBlock": block}]}]})


@pytest.mark.parametrize(
    "block, field, words",
    [
        ({"cidr": "10.0.0.0"}, f"{IB}.cidr", ["not a CIDR"]),
        ({"cidr": "10.0.0.0/33"}, f"{IB}.cidr", ["not a valid CIDR"]),
        ({"cidr": "300.0.0.0/8"}, f"{IB}.cidr", ["not a valid CIDR"]),
        ({"cidr": "fd00::/129"}, f"{IB}.cidr", ["not a valid CIDR"]),
        ({}, f"{IB}.cidr", ["required"]),
        ({"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}, f"{IB}.except[0]", ["strictly within"]),
        ({"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24", "10.0.0.0/16"]}, f"{IB}.except[1]", ["strictly within"]),
        ({"cidr": "10.0.0.0/16", "except": ["10.0.0.0/8"]}, f"{IB}.except[0]", ["strictly within"]),
        ({"cidr": "10.0.0.0/16", "except": ["fd00::/64"]}, f"{IB}.except[0]", ["family"]),
        ({"cidr": "10.0.0.0/16", "except": ["bogus/24"]}, f"{IB}.except[0]", ["not a valid CIDR"]),
    ],
)
def test_ipblock_rejections(block, field, words):
    e = reject(parse_network_policy, _ipblock_policy(block), field, "NetworkPolicy prod/web", *words)
    assert e.kind == "NetworkPolicy" and e.ref == "prod/web"


P = "spec.egress[0].ports[1]"


@pytest.mark.parametrize(
    "port, field, words",
    [
        ({"port": 0}, f"{P}.port", ["out of range"]),
        ({"port": 65536}, f"{P}.port", ["out of range"]),
        ({"port": True}, f"{P}.port", ["integer"]),
        ({"port": "80"}, f"{P}.port", ["IANA_SVC_NAME"]),
        ({"port": "Http"}, f"{P}.port", ["IANA_SVC_NAME"]),
        ({"port": "a--b"}, f"{P}.port", ["IANA_SVC_NAME"]),
        ({"port": "abcdefghijklmnop"}, f"{P}.port", ["IANA_SVC_NAME"]),
        ({"port": 100, "endPort": 99}, f"{P}.endPort", ["below port"]),
        ({"port": 100, "endPort": 70000}, f"{P}.endPort", ["out of range"]),
        ({"port": "http", "endPort": 99}, f"{P}.endPort", ["named port"]),
        ({"endPort": 99}, f"{P}.endPort", ["port is not specified"]),
        ({"port": 80, "protocol": "ICMP"}, f"{P}.protocol", ["unknown protocol"]),
        ({"port": 80, "protocol": "tcp"}, f"{P}.protocol", ["unknown protocol"]),
    ],
)
def test_port_rejections(port, field, words):
    d = policy({"egress": [{"ports": [{"port": 1}, port]}]})
    reject(parse_network_policy, d, field, "prod/web", *words)


S = "spec.podSelector"


@pytest.mark.parametrize(
    "selector, field, words",
    [
        (
            {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]},
            f"{S}.matchExpressions[0].operator",
            ["invalid operator"],
        ),
        ({"matchExpressions": [{"key": "a", "operator": "In"}]}, f"{S}.matchExpressions[0].values", ["non-empty"]),
        (
            {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]},
            f"{S}.matchExpressions[0].values",
            ["non-empty"],
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
            f"{S}.matchExpressions[0].values",
            ["must be empty"],
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["x"]}]},
            f"{S}.matchExpressions[0].values",
            ["must be empty"],
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["bad value"]}]},
            f"{S}.matchExpressions[0].values[0]",
            ["label value"],
        ),
        (
            {"matchExpressions": [{"key": "bad key", "operator": "Exists"}]},
            f"{S}.matchExpressions[0].key",
            ["label key"],
        ),
        ({"matchExpressions": [{"operator": "Exists"}]}, f"{S}.matchExpressions[0].key", ["required"]),
        ({"matchLabels": {"a": "b c"}}, f"{S}.matchLabels[a]", ["label value"]),
        ({"matchLabel": {"a": "b"}}, f"{S}.matchLabel", ["unknown selector field"]),
    ],
)
def test_selector_rejections(selector, field, words):
    reject(parse_network_policy, policy({"podSelector": selector}), field, "prod/web", *words)


def test_selector_rejection_inside_peer_names_full_path():
    d = policy(
        {"ingress": [{}, {"from": [{"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]}]}
    )
    reject(parse_network_policy, d, "spec.ingress[1].from[0].namespaceSelector.matchExpressions[0].values", "non-empty")


def test_peer_rejections():
    reject(parse_network_policy, policy({"ingress": [{"from": [{}]}]}), "spec.ingress[0].from[0]", "must specify")
    d = policy({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]})
    reject(parse_network_policy, d, "spec.egress[0].to[0]", "may not be combined")
    d = policy({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}]}]})
    reject(parse_network_policy, d, "spec.egress[0].to[0]", "may not be combined")


def test_policy_name_and_types_rejections():
    reject(parse_network_policy, policy({}, name="Web"), "metadata.name", "subdomain")
    reject(parse_network_policy, policy({}, name="a" * 254), "metadata.name", "subdomain")
    assert parse_network_policy(policy({}, name="allow.web-1")).name == "allow.web-1"
    reject(parse_network_policy, policy({}, ns="Prod"), "metadata.namespace", "DNS-1123 label")
    reject(parse_network_policy, policy({"policyTypes": ["ingress"]}), "spec.policyTypes[0]", "invalid policy type")
    reject(parse_network_policy, policy({"ingress": {"from": []}}), "spec.ingress", "must be a list")
    reject(parse_network_policy, policy({"ingress": [{"ports": 80}]}), "spec.ingress[0].ports", "must be a list")


# --- dispatch and YAML ---------------------------------------------------------------


def test_parse_object_dispatch_and_unknown():
    assert isinstance(parse_object(pod()), Pod)
    assert isinstance(parse_object(policy({})), NetworkPolicy)
    assert isinstance(parse_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}), Namespace)
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "x"}}
    e = reject(parse_object, svc, "kind", "unsupported kind", "x/s")
    assert e.kind == "Service"
    assert parse_object(svc, ignore_unknown=True) is None
    old = policy({})
    old["apiVersion"] = "extensions/v1beta1"
    reject(parse_object, old, "apiVersion", "unsupported apiVersion")
    noversion = copy.deepcopy(pod())
    del noversion["apiVersion"]
    assert isinstance(parse_object(noversion), Pod)


MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {team: a}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {app: a}}
  spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80, name: http}]}]}
  status: {podIPs: [{ip: 10.233.0.5}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: deny, namespace: x}
  spec: {podSelector: {}}
---
kind: PodList
apiVersion: v1
items:
- metadata: {name: b, namespace: x}
---
"""


def test_load_yaml_multi_document_and_lists():
    objs = load_yaml(MANIFEST, "m.yaml")
    assert [type(o).__name__ for o in objs] == ["Namespace", "Pod", "NetworkPolicy", "Pod"]
    assert objs[1].ips == (ip("10.233.0.5"),)
    assert objs[3].name == "b"


def test_load_yaml_json_input():
    import json

    objs = load_yaml(json.dumps({"kind": "List", "apiVersion": "v1", "items": [pod(), policy({})]}))
    assert [type(o).__name__ for o in objs] == ["Pod", "NetworkPolicy"]


def test_load_yaml_error_names_file_document_object_and_field():
    bad = MANIFEST.replace("containerPort: 80", "containerPort: 0")
    with pytest.raises(SourcedModelError) as ei:
        load_yaml(bad, "cluster.yaml")
    text = str(ei.value)
    assert text.startswith("cluster.yaml (document 2): Pod x/a: spec.containers[0].ports[0].containerPort:"), text
    assert isinstance(ei.value, ModelError) and ei.value.source == "cluster.yaml"


def test_load_yaml_syntax_error():
    with pytest.raises(ModelError) as ei:
        load_yaml("a: [unclosed\n", "broken.yaml")
    assert "broken.yaml" in str(ei.value) and "cannot parse" in str(ei.value)
    objs, errs = load_yaml_keep_going("a: [unclosed\n", "broken.yaml")
    assert objs == [] and len(errs) == 1


def test_load_yaml_unknown_kind():
    text = MANIFEST + "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: x}\n"
    with pytest.raises(ModelError, match="Deployment x/d: kind: unsupported kind"):
        load_yaml(text)
    assert len(load_yaml(text, ignore_unknown=True)) == 4


def test_load_yaml_keep_going_collects_errors_and_keeps_good_objects():
    bad = MANIFEST.replace("name: deny", "name: Deny").replace("ip: 10.233.0.5", "ip: nope")
    objs, errs = load_yaml_keep_going(bad, "c.yaml")
    assert [type(o).__name__ for o in objs] == ["Namespace", "Pod"]
    assert [(e.kind, e.ref, e.field_path) for e in errs] == [
        ("Pod", "x/a", "status.podIPs[0].ip"),
        ("NetworkPolicy", "x/Deny", "metadata.name"),
    ]
    assert all(str(e).startswith("c.yaml (document 2): ") for e in errs)


def test_non_mapping_document():
    with pytest.raises(ModelError, match="must be a mapping"):
        load_yaml("- a\n- b\n")


def test_parse_10000_pods_is_not_pathological():
    # Functional check that a relist-sized batch parses (figures live in bench/).
    pods = []
    for i in range(10000):
        d = pod()
        d["metadata"] = {"name": f"p{i}", "namespace": f"ns{i % 50}", "labels": {"app": f"a{i % 20}", "tier": "web"}}
        d["status"] = {"podIPs": [{"ip": f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"}]}
        pods.append(d)
    parsed = [parse_pod(d) for d in pods]
    assert len({p.key for p in parsed}) == 10000


def test_public_label_and_selector_helpers():
    from policy_agent.model import parse_labels, parse_selector

    assert dict(parse_labels({"a": "b"})) == {"a": "b"}
    assert parse_selector(None) == MATCH_ALL
    with pytest.raises(ModelError) as ei:
        parse_selector({"matchExpressions": [{"key": "a", "operator": "In"}]}, "spec.x", "Thing", "ns/t")
    assert str(ei.value).startswith("Thing ns/t: spec.x.matchExpressions[0].values:")
