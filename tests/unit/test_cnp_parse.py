"""ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) and Node parsing: shape and field errors."""

from __future__ import annotations

import copy
import ipaddress

import pytest

from policy_agent.model import ModelError, load_yaml, parse_object
from policy_agent.model.types import MATCH_ALL, CNPAction, CNPTier, LabelSelector, Labels, Protocol

BASE = {
    "apiVersion": "policy.networking.k8s.io/v1alpha2",
    "kind": "ClusterNetworkPolicy",
    "metadata": {"name": "guard", "resourceVersion": "7"},
    "spec": {
        "tier": "Admin",
        "priority": 10,
        "subject": {"namespaces": {"matchLabels": {"env": "prod"}}},
        "ingress": [
            {
                "name": "deny-from-dev",
                "action": "Deny",
                "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}],
                "protocols": [
                    {"tcp": {"destinationPort": {"number": 80}}},
                    {"udp": {"destinationPort": {"range": {"start": 1000, "end": 2000}}}},
                    {"sctp": {"destinationPort": {"number": 9}}},
                    {"destinationNamedPort": "http"},
                ],
            }
        ],
        "egress": [
            {"action": "Accept", "to": [{"networks": ["10.0.0.1/8", "fd00::/64", "10.0.0.0/8"]}]},
            {"action": "Pass", "to": [{"nodes": {"matchLabels": {"role": "infra"}}}]},
            {"action": "Accept", "to": [{"domainNames": ["*.example.com", "kubernetes.io"]}]},
            {"action": "Deny", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"a": "b"}}}}]},
        ],
    },
}


def cnp(**spec_changes):
    d = copy.deepcopy(BASE)
    for k, v in spec_changes.items():
        if v is None:
            d["spec"].pop(k, None)
        else:
            d["spec"][k] = v
    return d


def error_of(d) -> ModelError:
    with pytest.raises(ModelError) as ei:
        parse_object(d)
    return ei.value


def test_full_object_parses_to_the_model():
    p = parse_object(BASE)
    assert (p.name, p.tier, p.priority, p.resource_version) == ("guard", CNPTier.ADMIN, 10, "7")
    assert p.subject_namespaces == LabelSelector(Labels({"env": "prod"})) and p.subject_pods == MATCH_ALL
    r = p.ingress[0]
    assert (r.name, r.action) == ("deny-from-dev", CNPAction.DENY)
    assert r.peers[0].kind == "namespaces"
    assert [(x.protocol, x.start, x.end, x.named_port) for x in r.ports] == [
        (Protocol.TCP, 80, 80, None),
        (Protocol.UDP, 1000, 2000, None),
        (Protocol.SCTP, 9, 9, None),
        (None, None, None, "http"),
    ]
    nets = p.egress[0].peers[0].networks
    assert nets == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/64"))  # normalised, a set
    assert p.egress[1].action is CNPAction.PASS and p.egress[1].peers[0].kind == "nodes"
    assert p.egress[2].peers[0].domain_names == ("*.example.com", "kubernetes.io")
    assert p.egress[3].peers[0].kind == "pods" and p.egress[3].peers[0].namespace_selector == MATCH_ALL


def test_pods_subject_and_baseline_tier():
    p = parse_object(cnp(tier="Baseline", priority=0, subject={"pods": {"podSelector": {"matchLabels": {"a": "b"}}}}))
    assert p.tier is CNPTier.BASELINE and p.priority == 0
    assert p.subject_namespaces == MATCH_ALL and p.subject_pods == LabelSelector(Labels({"a": "b"}))


@pytest.mark.parametrize(
    "change, path, text",
    [
        ({"tier": "Default"}, "spec.tier", "Admin or Baseline"),
        ({"tier": None}, "spec.tier", "Admin or Baseline"),
        ({"priority": 1001}, "spec.priority", "out of range 0-1000"),
        ({"priority": -1}, "spec.priority", "out of range"),
        ({"priority": "1"}, "spec.priority", "integer"),
        ({"priority": None}, "spec.priority", "integer"),
        ({"subject": {}}, "spec.subject", "namespaces or pods"),
        ({"subject": {"namespaces": {}, "pods": {"podSelector": {}}}}, "spec.subject", "exactly one"),
        ({"subject": {"pods": {"namespaceSelector": {}}}}, "spec.subject.pods.podSelector", "required"),
        ({"ingress": [{"action": "Allow", "from": [{"namespaces": {}}]}]}, "spec.ingress[0].action", "Accept, Deny"),
        ({"ingress": [{"action": "Accept"}]}, "spec.ingress[0].from", "required"),
        ({"ingress": [{"action": "Accept", "from": []}]}, "spec.ingress[0].from", "at least one"),
        ({"ingress": [{"action": "Accept", "from": [{"namespaces": {}}]}] * 26}, "spec.ingress", "at most 25"),
        ({"ingress": [{"action": "Accept", "name": "n" * 101, "from": [{"namespaces": {}}]}]}, "spec.ingress[0].name",
         "at most 100"),
        ({"ingress": [{"action": "Accept", "from": [{"namespaces": {}, "pods": {"podSelector": {}}}]}]},
         "spec.ingress[0].from[0]", "exactly one"),
        ({"ingress": [{"action": "Accept", "from": [{"namespaces": {}}], "protocols": []}]},
         "spec.ingress[0].protocols", "at least one"),
        ({"ingress": [{"action": "Accept", "from": [{"namespaces": {}}], "protocols": [{"tcp": {}}]}]},
         "spec.ingress[0].protocols[0].tcp.destinationPort", "required"),
        ({"ingress": [{"action": "Accept", "from": [{"namespaces": {}}],
                       "protocols": [{"tcp": {"destinationPort": {"number": 0}}}]}]},
         "spec.ingress[0].protocols[0].tcp.destinationPort.number", "out of range"),
        ({"ingress": [{"action": "Accept", "from": [{"namespaces": {}}],
                       "protocols": [{"udp": {"destinationPort": {"range": {"start": 90, "end": 90}}}}]}]},
         "spec.ingress[0].protocols[0].udp.destinationPort.range", "less than end"),
        ({"ingress": [{"action": "Accept", "from": [{"namespaces": {}}],
                       "protocols": [{"tcp": {"destinationPort": {"number": 80, "range": {"start": 1, "end": 2}}}}]}]},
         "spec.ingress[0].protocols[0].tcp.destinationPort", "exactly one"),
        ({"ingress": [{"action": "Accept", "from": [{"namespaces": {}}],
                       "protocols": [{"tcp": {"destinationPort": {"number": 80}}, "destinationNamedPort": "x"}]}]},
         "spec.ingress[0].protocols[0]", "exactly one"),
        ({"egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/33"]}]}]},
         "spec.egress[0].to[0].networks[0]", "not a valid CIDR"),
        ({"egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.1"]}]}]},
         "spec.egress[0].to[0].networks[0]", "not a CIDR"),
        ({"egress": [{"action": "Accept", "to": [{"networks": []}]}]}, "spec.egress[0].to[0].networks",
         "at least one"),
        ({"egress": [{"action": "Accept", "to": [{"domainNames": ["*foo.com"]}]}]},
         "spec.egress[0].to[0].domainNames[0]", "not a domain name"),
        ({"egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}],
                      "protocols": [{"destinationNamedPort": "http"}]}]},
         "spec.egress[0]", "cannot be set with destinationNamedPort"),
        ({"egress": [{"action": "Accept", "to": [{"nodes": {"matchLabels": {"a": 1}}}]}]},
         "spec.egress[0].to[0].nodes.matchLabels[a]", "must be a string"),
    ],
)
def test_field_errors_name_the_object_and_field(change, path, text):
    err = error_of(cnp(**change))
    assert err.kind == "ClusterNetworkPolicy" and err.ref == "guard"
    assert err.field_path == path, str(err)
    assert text in err.message, str(err)
    assert str(err).startswith(f"ClusterNetworkPolicy guard: {path}: ")


def test_ingress_peers_are_only_namespaces_and_pods():
    # networks in an ingress peer is not a field the API has there: to us it is a peer
    # with no known field, kept as "unknown" and enforced fail-closed.
    p = parse_object(cnp(ingress=[{"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}]))
    assert p.ingress[0].peers[0].kind == "unknown"


def test_unknown_peer_type_is_kept_for_fail_closed():
    p = parse_object(cnp(egress=[{"action": "Accept", "to": [{"services": {"name": "x"}}]}]))
    assert p.egress[0].peers[0].kind == "unknown"


def test_wrong_api_version_and_name():
    d = cnp()
    d["apiVersion"] = "policy.networking.k8s.io/v1alpha1"
    assert error_of(d).field_path == "apiVersion"
    d = cnp()
    d["metadata"]["name"] = "Not_Valid"
    assert error_of(d).field_path == "metadata.name"


def test_node_keeps_labels_and_ip_addresses_only():
    n = parse_object(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "worker-1", "labels": {"role": "infra"}},
            "spec": {"podCIDR": "10.1.0.0/24"},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "10.0.0.5"},
                    {"type": "InternalIP", "address": "fd00::5"},
                    {"type": "Hostname", "address": "worker-1"},
                    {"type": "ExternalIP", "address": "::ffff:192.0.2.5"},
                ]
            },
        }
    )
    assert n.name == "worker-1" and dict(n.labels) == {"role": "infra"}
    assert [str(a) for a in n.addresses] == ["10.0.0.5", "fd00::5", "192.0.2.5"]
    with pytest.raises(ModelError) as ei:
        parse_object({"kind": "Node", "metadata": {"name": "w"}, "status": {"addresses": [{"address": 5}]}})
    assert ei.value.field_path == "status.addresses[0].address"


def test_yaml_list_and_file_errors_name_the_file():
    text = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicyList\nitems:\n" + (
        "- metadata: {name: a}\n  spec: {tier: Admin, priority: 1, subject: {namespaces: {}}}\n"
    )
    (obj,) = load_yaml(text, "cnp.yaml")
    assert obj.name == "a"
    with pytest.raises(ModelError) as ei:
        load_yaml(text.replace("priority: 1", "priority: 5000"), "cnp.yaml")
    assert str(ei.value).startswith("cnp.yaml: ClusterNetworkPolicy a: spec.priority:")
