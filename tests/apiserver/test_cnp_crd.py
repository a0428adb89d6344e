"""Our ClusterNetworkPolicy CRD (manifests/crd/) on the real kube-apiserver 1.20.2.

- it installs as apiextensions.k8s.io/v1 on 1.20, becomes Established with a structural
  schema, and the server keeps the schema exactly as written (nothing pruned or dropped);
- the examples are accepted (server-side dry run) and come back with every field we use;
- what the schema validates, the server refuses, naming the field, and our parser refuses
  the same object naming the same field;
- what only the upstream CEL rules check (1.20 has no CEL) the server accepts, and our
  parser refuses, naming the field: the agent is where those rules hold.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from cnp_helpers import CRD_FILE, CRD_NAME, EXAMPLES, cnp, crd_installed, install_crd, kubectl_create

from policy_agent.model.parse import parse_cluster_network_policy
from policy_agent.model.types import CNPAction, CNPTier, ModelError

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def crd(cluster):
    if not crd_installed(cluster):
        install_crd(cluster)
    return json.loads(cluster.kubectl("get", "crd", CRD_NAME, "-o", "json"))


def test_crd_is_established_structural_and_stored_as_written(crd, cluster):
    if cluster.local is None and crd["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") != "policy-agent":
        pytest.skip("the external cluster serves someone else's CRD")
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds.get("Established") == "True" and conds.get("NamesAccepted") == "True", conds
    assert conds.get("NonStructuralSchema", "False") == "False", conds
    assert conds.get("KubernetesAPIApprovalPolicyConformant") == "True", conds
    ours = yaml.safe_load(CRD_FILE.read_text())
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"]["shortNames"] == ["cnp"]
    [version] = crd["spec"]["versions"]
    [want] = ours["spec"]["versions"]
    assert version["name"] == "v1alpha2" and version["served"] and version["storage"]
    # 1.20 would silently drop a schema keyword it does not know: equal means all of it holds.
    assert version["schema"] == want["schema"]
    assert version["additionalPrinterColumns"] == want["additionalPrinterColumns"]
    assert version["subresources"] == {"status": {}}


def _example_policies() -> list[dict]:
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "ClusterNetworkPolicy"]
    return docs


def test_examples_are_accepted_and_keep_every_field(crd, cluster):
    policies = _example_policies()
    assert {p["spec"]["tier"] for p in policies} == {"Admin", "Baseline"}
    for doc in policies:
        p = kubectl_create(cluster, doc, "--dry-run=server", "-o", "json")
        assert p.returncode == 0, f"{doc['metadata']['name']}: {p.stderr}"
        stored = json.loads(p.stdout)
        assert stored["spec"] == doc["spec"], doc["metadata"]["name"]  # nothing pruned
        assert parse_cluster_network_policy(stored) == parse_cluster_network_policy(doc)


def _base() -> dict:
    return cnp(
        "pa-invalid", "Admin", 10, {"namespaces": {}},
        ingress=[{"name": "r", "action": "Deny", "from": [{"namespaces": {}}],
                  "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}],
        egress=[{"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}]}],
    )


def _set(path: str, value):
    def mutate(d: dict) -> None:
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return mutate


_DELETE = object()
_RULE = {"action": "Deny", "from": [{"namespaces": {}}]}

# (id, mutation, field the server names, field our parser names; None: see the comment)
REFUSED = [
    ("priority-above-1000", _set("spec.priority", 1001), "spec.priority", "spec.priority"),
    ("priority-negative", _set("spec.priority", -1), "spec.priority", "spec.priority"),
    ("priority-missing", _set("spec.priority", _DELETE), "spec.priority", "spec.priority"),
    ("tier-unknown", _set("spec.tier", "Application"), "spec.tier", "spec.tier"),
    ("action-unknown", _set("spec.ingress.0.action", "Allow"), "spec.ingress[0].action", "spec.ingress[0].action"),
    ("subject-two-fields", _set("spec.subject", {"namespaces": {}, "pods": {"podSelector": {}}}),
     "spec.subject", "spec.subject"),
    ("subject-empty", _set("spec.subject", {}), "spec.subject", "spec.subject"),
    ("peer-two-fields", _set("spec.ingress.0.from.0", {"namespaces": {}, "pods": {"podSelector": {}}}),
     "spec.ingress[0].from[0]", "spec.ingress[0].from[0]"),
    ("from-empty", _set("spec.ingress.0.from", []), "spec.ingress[0].from", "spec.ingress[0].from"),
    ("26-rules", _set("spec.ingress", [_RULE] * 26), "spec.ingress", "spec.ingress"),
    ("26-peers", _set("spec.ingress.0.from", [{"namespaces": {}}] * 26), "spec.ingress[0].from",
     "spec.ingress[0].from"),
    ("port-zero", _set("spec.ingress.0.protocols.0.tcp.destinationPort.number", 0),
     "spec.ingress[0].protocols[0].tcp.destinationPort.number", "spec.ingress[0].protocols[0].tcp.destinationPort.number"),
    ("port-65536", _set("spec.ingress.0.protocols.0.tcp.destinationPort.number", 65536),
     "spec.ingress[0].protocols[0].tcp.destinationPort.number", "spec.ingress[0].protocols[0].tcp.destinationPort.number"),
    ("port-number-and-range", _set("spec.ingress.0.protocols.0.tcp.destinationPort",
                                   {"number": 80, "range": {"start": 1, "end": 2}}),
     "spec.ingress[0].protocols[0].tcp.destinationPort", "spec.ingress[0].protocols[0].tcp.destinationPort"),
    ("two-protocols-in-one-entry", _set("spec.ingress.0.protocols.0", {"tcp": {"destinationPort": {"number": 1}},
                                                                       "udp": {"destinationPort": {"number": 1}}}),
     "spec.ingress[0].protocols[0]", "spec.ingress[0].protocols[0]"),
    ("rule-name-101", _set("spec.ingress.0.name", "r" * 101), "spec.ingress[0].name", "spec.ingress[0].name"),
    ("cidr-prefix-33", _set("spec.egress.0.to.0.networks", ["10.0.0.0/33"]), "spec.egress[0].to[0].networks[0]",
     "spec.egress[0].to[0].networks[0]"),
    ("cidr-garbage", _set("spec.egress.0.to.0.networks", ["ten-dot-zero/8"]), "spec.egress[0].to[0].networks[0]",
     "spec.egress[0].to[0].networks[0]"),
    ("domain-garbage", _set("spec.egress.0.to.0", {"domainNames": ["bad domain!"]}),
     "spec.egress[0].to[0].domainNames[0]", "spec.egress[0].to[0].domainNames[0]"),
    ("selector-operator", _set("spec.subject", {"namespaces": {"matchExpressions": [{"key": "a", "operator": "Equals"}]}}),
     "spec.subject.namespaces.matchExpressions[0].operator", "spec.subject.namespaces.matchExpressions[0].operator"),
    # An egress-only peer in an ingress rule is an unknown field there: pruned, and the
    # peer left with no field fails minProperties. Our parser would read such a peer as
    # one of a newer CRD and fail closed (the API's rule), so only the server is asked.
    ("nodes-peer-in-ingress", _set("spec.ingress.0.from.0", {"nodes": {}}), "spec.ingress[0].from[0]", None),
]

# Upstream checks these with CEL (x-kubernetes-validations), which 1.20 does not have.
CEL_ONLY = [
    ("range-start-not-below-end", _set("spec.ingress.0.protocols.0.tcp.destinationPort",
                                       {"range": {"start": 90, "end": 80}}),
     "spec.ingress[0].protocols[0].tcp.destinationPort.range"),
    ("named-port-with-networks-peer", _set("spec.egress.0.protocols", [{"destinationNamedPort": "http"}]),
     "spec.egress[0]"),
    ("ipv6-cidr-syntax", _set("spec.egress.0.to.0.networks", ["1::2::3/64"]), "spec.egress[0].to[0].networks[0]"),
]


def test_the_base_object_is_valid(crd, cluster):
    p = kubectl_create(cluster, _base(), "--dry-run=server")
    assert p.returncode == 0, p.stderr
    pol = parse_cluster_network_policy(_base())
    assert pol.tier is CNPTier.ADMIN and pol.ingress[0].action is CNPAction.DENY


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_server_refuses_what_the_schema_validates(case, crd, cluster):
    _, mutate, server_field, our_field = case
    doc = copy.deepcopy(_base())
    mutate(doc)
    p = kubectl_create(cluster, doc, "--dry-run=server")
    assert p.returncode != 0, f"the server accepted it: {p.stdout}"
    # The 1.20 server names list fields without indices: spec.ingress.from, not ...[0].
    unindexed = re.sub(r"\[\d+\]", "", server_field)
    assert "is invalid" in p.stderr and f"{unindexed}:" in p.stderr, p.stderr
    if our_field is not None:
        with pytest.raises(ModelError) as e:
            parse_cluster_network_policy(doc)
        assert e.value.field_path == our_field and "ClusterNetworkPolicy pa-invalid" in str(e.value)


@pytest.mark.parametrize("case", CEL_ONLY, ids=[c[0] for c in CEL_ONLY])
def test_cel_only_rules_are_checked_by_the_agent(case, crd, cluster):
    _, mutate, our_field = case
    doc = copy.deepcopy(_base())
    mutate(doc)
    p = kubectl_create(cluster, doc, "--dry-run=server")
    assert p.returncode == 0, f"1.20 refused it after all (then say so in the CRD header): {p.stderr}"
    with pytest.raises(ModelError) as e:
        parse_cluster_network_policy(doc)
    assert e.value.field_path == our_field
