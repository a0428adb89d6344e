"""Our ClusterNetworkPolicy CRD (manifests/crd/) offline: its schema accepts the examples,
refuses what it should, and agrees with the agent's parser on enums and bounds.

The real API server's verdicts on the same CRD are in tests/apiserver/test_cnp_crd.py;
this runs without root, in the fast suite. The schema is read as JSON Schema with every
object closed (``additionalProperties: false`` where the CRD lists properties): the API
server prunes unknown fields, kubectl's strict validation refuses them; closed is the
stricter reading, so an example with a misspelt field fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from policy_agent.model import parse
from policy_agent.model.types import CNPAction, CNPTier

REPO = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((REPO / "manifests" / "crd" / "10-clusternetworkpolicies.yaml").read_text())
EXAMPLES = REPO / "examples" / "cluster-network-policy"


def _closed(schema):
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


SCHEMA = _closed(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)
SPEC = SCHEMA["properties"]["spec"]["properties"]


def _examples() -> list[dict]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "ClusterNetworkPolicy"]
    return out


POLICIES = _examples()


def test_crd_identity():
    assert CRD["metadata"]["name"] == "clusternetworkpolicies.policy.networking.k8s.io"
    assert CRD["spec"]["scope"] == "Cluster" and CRD["spec"]["group"] == "policy.networking.k8s.io"
    assert [v["name"] for v in CRD["spec"]["versions"]] == ["v1alpha2"]
    assert f"{CRD['spec']['group']}/v1alpha2" == parse.CNP_API_VERSION
    # 1.20 has no CEL: a rule there would be dropped silently, so none may be written.
    assert "x-kubernetes-validations" not in yaml.safe_dump(CRD)


def test_schema_and_parser_agree_on_enums_and_bounds():
    assert SPEC["tier"]["enum"] == [t.value for t in CNPTier]
    assert (SPEC["priority"]["minimum"], SPEC["priority"]["maximum"]) == (0, parse.CNP_MAX_PRIORITY)
    for direction, peers in (("ingress", "from"), ("egress", "to")):
        rule = SPEC[direction]["items"]
        assert SPEC[direction]["maxItems"] == parse.CNP_MAX_RULES
        assert rule["properties"]["action"]["enum"] == [a.value for a in CNPAction]
        assert rule["properties"]["name"]["maxLength"] == parse.CNP_RULE_NAME_MAX
        assert rule["properties"][peers]["maxItems"] == parse.CNP_MAX_RULES
        assert rule["properties"]["protocols"]["maxItems"] == parse.CNP_MAX_RULES
    egress_peer = SPEC["egress"]["items"]["properties"]["to"]["items"]["properties"]
    ingress_peer = SPEC["ingress"]["items"]["properties"]["from"]["items"]["properties"]
    assert set(ingress_peer) == {"namespaces", "pods"}
    assert set(egress_peer) == {"namespaces", "pods", "nodes", "networks", "domainNames"}
    assert egress_peer["domainNames"]["items"]["pattern"] == parse._DOMAIN_RE.pattern


def test_examples_cover_both_tiers_every_action_and_peer_kind():
    assert len(POLICIES) >= 4
    tiers = {p["spec"]["tier"] for p in POLICIES}
    actions = {r["action"] for p in POLICIES for d in ("ingress", "egress") for r in p["spec"].get(d, [])}
    peers = {k for p in POLICIES for r in p["spec"].get("egress", []) for peer in r["to"] for k in peer}
    assert tiers == {"Admin", "Baseline"} and actions == {"Accept", "Deny", "Pass"}
    assert {"nodes", "networks", "pods", "namespaces"} <= peers


@pytest.mark.parametrize("doc", POLICIES, ids=[p["metadata"]["name"] for p in POLICIES])
def test_example_validates_and_parses(doc):
    errors = sorted(VALIDATOR.iter_errors(doc), key=str)
    assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    pol = parse.parse_cluster_network_policy(doc)
    assert pol.name == doc["metadata"]["name"] and pol.priority == doc["spec"]["priority"]


def _mutations():
    def at(path, value):
        def f(d):
            node = d
            keys = path.split(".")
            for k in keys[:-1]:
                node = node[int(k)] if isinstance(node, list) else node[k]
            node[keys[-1]] = value
        return f

    return [
        ("priority", at("spec.priority", 1001)),
        ("tier", at("spec.tier", "Application")),
        ("action", at("spec.ingress.0.action", "Allow")),
        ("subject-both", at("spec.subject", {"namespaces": {}, "pods": {"podSelector": {}}})),
        ("peer-empty", at("spec.ingress.0.from", [{}])),
        ("port-0", at("spec.ingress.0.protocols", [{"tcp": {"destinationPort": {"number": 0}}}])),
        ("cidr", at("spec.egress", [{"action": "Deny", "to": [{"networks": ["10.0.0.0/33"]}]}])),
        ("typo", at("spec.ingress.0.form", [])),
    ]


@pytest.mark.parametrize("case", _mutations(), ids=lambda c: c[0])
def test_schema_refuses(case):
    doc = copy.deepcopy(next(p for p in POLICIES if p["spec"].get("ingress")))
    case[1](doc)
    assert list(VALIDATOR.iter_errors(doc)), f"{case[0]}: accepted"
